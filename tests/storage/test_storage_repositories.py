from __future__ import annotations

import pytest
from sqlalchemy.exc import IntegrityError

from memllm_storage.repositories import (
    ApiKeyRepository,
    ChunkRepository,
    DocumentRepository,
    KnowledgeBaseRepository,
    MessageRepository,
    NotFoundError,
    SessionRepository,
    TenantRepository,
    hash_api_key,
)


async def test_tenants_and_api_keys(store):
    async with store.sessions() as s:
        t = await TenantRepository(s).create("acme")
        keys = ApiKeyRepository(s)
        row, plain = await keys.create(t.id, "ci")
        await s.commit()
    assert row.key_hash == hash_api_key(plain) and plain not in row.key_hash
    async with store.sessions() as s:
        keys = ApiKeyRepository(s)
        assert (await keys.authenticate(plain)).id == t.id
        assert await keys.authenticate(plain + "x") is None
        await keys.revoke(row.id)
        await s.commit()
    async with store.sessions() as s:
        assert await ApiKeyRepository(s).authenticate(plain) is None
        assert [k.id for k in await ApiKeyRepository(s).list(t.id)] == [row.id]


async def test_documents_replace_by_source_name_and_cascade(store):
    async with store.sessions() as s:
        kb = await KnowledgeBaseRepository(s).create("kb")
        docs = DocumentRepository(s)
        d1 = await docs.create(kb.id, "a.txt", sha256="1" * 64, meta={"lang": "en"})
        await ChunkRepository(s).add_many(
            d1.id,
            [
                {
                    "ordinal": 0,
                    "char_start": 0,
                    "char_end": 5,
                    "token_start": 0,
                    "token_end": 2,
                    "text": "hello",
                }
            ],
        )
        d2, old = await docs.replace(kb.id, "a.txt", sha256="2" * 64)
        await s.commit()
    assert old.id == d1.id and d2.id != d1.id  # ids are never reused
    async with store.sessions() as s:
        docs = DocumentRepository(s)
        listed = await docs.list(kb.id)
        assert [d.id for d in listed] == [d2.id] and listed[0].sha256 == "2" * 64
        assert await ChunkRepository(s).list(d1.id) == []
        await docs.set_status(d2.id, "error", error="boom")
        with pytest.raises(NotFoundError):
            await docs.get(d1.id)
        await s.commit()
    async with store.sessions() as s:
        assert (await DocumentRepository(s).get(d2.id)).error == "boom"
        with pytest.raises(IntegrityError, match="status"):
            await DocumentRepository(s).create(kb.id, "b.txt", sha256="3" * 64, status="bogus")


async def test_sessions_messages_paged_history(store):
    async with store.sessions() as s:
        sess = await SessionRepository(s).create("chat")
        msgs = MessageRepository(s)
        for i in range(7):
            await msgs.append(sess.id, "user" if i % 2 == 0 else "assistant", f"m{i}", 10 * i, 10 * i + 10)
        await s.commit()
    async with store.sessions() as s:
        msgs = MessageRepository(s)
        page = await msgs.history(sess.id, limit=3)
        assert [m.content for m in page] == ["m4", "m5", "m6"]
        page2 = await msgs.history(sess.id, limit=3, before=page[0].ordinal)
        assert [m.content for m in page2] == ["m1", "m2", "m3"]
        assert await msgs.count(sess.id) == 7
        assert (await SessionRepository(s).get(sess.id)).token_count == 70
        await SessionRepository(s).delete(sess.id)
        await s.commit()
    async with store.sessions() as s:
        assert await MessageRepository(s).count(sess.id) == 0


async def test_names_unique_per_tenant(store):
    async with store.sessions() as s:
        t1 = await TenantRepository(s).create("t1")
        t2 = await TenantRepository(s).create("t2")
        kbs = KnowledgeBaseRepository(s)
        await kbs.create("same", tenant_id=t1.id)
        await kbs.create("same", tenant_id=t2.id)
        await s.commit()
        assert [k.name for k in await kbs.list(t1.id)] == ["same"]
        assert (await kbs.get_by_name("same", t2.id)).tenant_id == t2.id
        with pytest.raises(IntegrityError):
            await kbs.create("same", tenant_id=t1.id)

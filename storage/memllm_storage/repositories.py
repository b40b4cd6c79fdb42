"""Repositories: small async data-access classes over one ``AsyncSession``.

A repository never commits: the caller owns the transaction (services, or
:class:`memllm_storage.store.MemoryStore` writers for anything that touches memory blocks). Deleting a
document, session or knowledge base here removes rows only; to also drop their vectors from the
in-process indexes at once, delete through a memory writer (``MemoryStore.writer``) or
``MemoryStore.delete_owner``; other processes catch up on their next ``refresh()``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, delete, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from memllm_storage import models
from memllm_storage.models import (
    ApiKey,
    ChatSession,
    Chunk,
    Document,
    IndexState,
    KnowledgeBase,
    MemoryBlockRow,
    Message,
    Tenant,
    utcnow,
)
from memllm_storage.owners import Owner

API_KEY_PREFIX = "mk_"


class NotFoundError(LookupError):
    """A row asked for by id or name does not exist."""


MAX_ID_DIGITS = 18  # ids are signed 64-bit: every 18-digit number fits


def parse_id(text: str, max_digits: int = MAX_ID_DIGITS) -> int | None:
    """``text`` as a row id (or any non-negative number) when it is 1 to ``max_digits`` ASCII digits,
    else None (``str.isdigit`` also takes Unicode digits such as ``"²"``, which ``int`` refuses, and
    ``int`` refuses over 4,300 digits: both once answered 500)."""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= max_digits else None


class _Repo:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def _get(self, model: type, row_id: int) -> Any:
        row = await self.session.get(model, row_id)
        if row is None:
            raise NotFoundError(f"{model.__tablename__} {row_id} not found")
        return row


def hash_api_key(key: str) -> str:
    """sha256 hex of an API key (keys are 32 random bytes, so a fast hash is enough)."""
    return hashlib.sha256(key.encode()).hexdigest()


class TenantRepository(_Repo):
    async def create(self, name: str) -> Tenant:
        tenant = Tenant(name=name)
        self.session.add(tenant)
        await self.session.flush()
        return tenant

    async def get(self, tenant_id: int) -> Tenant:
        return await self._get(Tenant, tenant_id)

    async def get_by_name(self, name: str) -> Tenant | None:
        return (await self.session.execute(select(Tenant).where(Tenant.name == name))).scalar_one_or_none()

    async def list(self) -> Sequence[Tenant]:
        return (await self.session.execute(select(Tenant).order_by(Tenant.id))).scalars().all()

    async def delete(self, tenant_id: int) -> None:
        await self.session.delete(await self.get(tenant_id))
        await self.session.flush()


class ApiKeyRepository(_Repo):
    async def create(self, tenant_id: int, name: str = "") -> tuple[ApiKey, str]:
        """Create a key; returns (row, plaintext). Only the hash is stored."""
        plaintext = API_KEY_PREFIX + secrets.token_urlsafe(32)
        row = ApiKey(tenant_id=tenant_id, name=name, prefix=plaintext[:10], key_hash=hash_api_key(plaintext))
        self.session.add(row)
        await self.session.flush()
        return row, plaintext

    async def authenticate(self, plaintext: str) -> Tenant | None:
        """The tenant of a valid, unrevoked key (and stamp its last use), else None."""
        row = (
            await self.session.execute(select(ApiKey).where(ApiKey.key_hash == hash_api_key(plaintext)))
        ).scalar_one_or_none()
        if row is None or row.revoked_at is not None:
            return None
        row.last_used_at = utcnow()
        return await self.session.get(Tenant, row.tenant_id)

    async def list(self, tenant_id: int) -> Sequence[ApiKey]:
        q = select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.id)
        return (await self.session.execute(q)).scalars().all()

    async def revoke(self, key_id: int) -> None:
        row = await self._get(ApiKey, key_id)
        row.revoked_at = utcnow()
        await self.session.flush()

    async def delete(self, key_id: int) -> None:
        await self.session.delete(await self._get(ApiKey, key_id))
        await self.session.flush()


class KnowledgeBaseRepository(_Repo):
    async def create(self, name: str, tenant_id: int | None = None, description: str = "") -> KnowledgeBase:
        kb = KnowledgeBase(name=name, tenant_id=tenant_id, description=description)
        self.session.add(kb)
        await self.session.flush()
        return kb

    async def get(self, kb_id: int) -> KnowledgeBase:
        return await self._get(KnowledgeBase, kb_id)

    async def get_by_name(self, name: str, tenant_id: int | None = None) -> KnowledgeBase | None:
        q = select(KnowledgeBase).where(KnowledgeBase.name == name, _tenant_is(KnowledgeBase, tenant_id))
        return (await self.session.execute(q)).scalar_one_or_none()

    async def list(self, tenant_id: int | None = None) -> Sequence[KnowledgeBase]:
        q = select(KnowledgeBase).where(_tenant_is(KnowledgeBase, tenant_id)).order_by(KnowledgeBase.id)
        return (await self.session.execute(q)).scalars().all()

    async def delete(self, kb_id: int) -> None:
        """Rows only (cascade); prefer ``MemoryStore.delete_owner(Owner.kb(kb_id))``."""
        await self.session.execute(delete(KnowledgeBase).where(KnowledgeBase.id == kb_id))


def _tenant_is(model: Any, tenant_id: int | None) -> Any:
    return model.tenant_id.is_(None) if tenant_id is None else model.tenant_id == tenant_id


class DocumentRepository(_Repo):
    async def create(
        self,
        kb_id: int,
        source_name: str,
        *,
        sha256: str,
        media_type: str = "text/plain",
        meta: dict[str, Any] | None = None,
        status: str = "pending",
        token_count: int = 0,
        char_count: int = 0,
    ) -> Document:
        doc = Document(
            knowledge_base_id=kb_id,
            source_name=source_name,
            sha256=sha256,
            media_type=media_type,
            meta=meta or {},
            status=status,
            token_count=token_count,
            char_count=char_count,
        )
        self.session.add(doc)
        await self.session.flush()
        return doc

    async def get(self, doc_id: int) -> Document:
        return await self._get(Document, doc_id)

    async def get_by_source(self, kb_id: int, source_name: str) -> Document | None:
        q = select(Document).where(Document.knowledge_base_id == kb_id, Document.source_name == source_name)
        return (await self.session.execute(q)).scalar_one_or_none()

    async def list(self, kb_id: int, status: str | None = None) -> Sequence[Document]:
        q = select(Document).where(Document.knowledge_base_id == kb_id)
        if status is not None:
            q = q.where(Document.status == status)
        return (await self.session.execute(q.order_by(Document.id))).scalars().all()

    async def set_status(self, doc_id: int, status: str, error: str | None = None, **fields: Any) -> Document:
        doc = await self.get(doc_id)
        doc.status, doc.error = status, error
        for k, v in fields.items():
            setattr(doc, k, v)
        await self.session.flush()
        return doc

    async def delete(self, doc_id: int) -> None:
        """Rows only (cascade); through a memory writer the vectors go at once too."""
        await self.session.execute(delete(Document).where(Document.id == doc_id))

    async def replace(self, kb_id: int, source_name: str, **fields: Any) -> tuple[Document, Document | None]:
        """Delete the document with this source name (if any) and create the new one, in the caller's
        transaction; returns (new, old). Use :meth:`memllm_storage.writer.OwnerWriter.replace_document` to
        drop the old blocks' vectors as well."""
        old = await self.get_by_source(kb_id, source_name)
        if old is not None:
            await self.delete(old.id)
            await self.session.flush()
        return await self.create(kb_id, source_name, **fields), old


class ChunkRepository(_Repo):
    async def add_many(self, document_id: int, chunks: Sequence[dict[str, Any]]) -> list[Chunk]:
        """chunks: dicts with ordinal, char_start, char_end, token_start, token_end, text."""
        rows = [Chunk(document_id=document_id, **c) for c in chunks]
        self.session.add_all(rows)
        await self.session.flush()
        return rows

    async def list(self, document_id: int) -> Sequence[Chunk]:
        q = select(Chunk).where(Chunk.document_id == document_id).order_by(Chunk.ordinal)
        return (await self.session.execute(q)).scalars().all()

    async def get_many(self, chunk_ids: Sequence[int]) -> dict[int, Chunk]:
        q = select(Chunk).where(Chunk.id.in_(list(chunk_ids)))
        return {c.id: c for c in (await self.session.execute(q)).scalars()}


class SessionRepository(_Repo):
    async def create(self, name: str, tenant_id: int | None = None, meta: dict[str, Any] | None = None) -> ChatSession:
        s = ChatSession(name=name, tenant_id=tenant_id, meta=meta or {}, token_count=0)
        self.session.add(s)
        await self.session.flush()
        return s

    async def get(self, session_id: int) -> ChatSession:
        return await self._get(ChatSession, session_id)

    async def get_by_name(self, name: str, tenant_id: int | None = None) -> ChatSession | None:
        q = select(ChatSession).where(ChatSession.name == name, _tenant_is(ChatSession, tenant_id))
        return (await self.session.execute(q)).scalar_one_or_none()

    async def list(self, tenant_id: int | None = None) -> Sequence[ChatSession]:
        q = select(ChatSession).where(_tenant_is(ChatSession, tenant_id)).order_by(ChatSession.id)
        return (await self.session.execute(q)).scalars().all()

    async def delete(self, session_id: int) -> None:
        """Rows only (cascade); prefer ``MemoryStore.delete_owner(Owner.session(id))``."""
        await self.session.execute(delete(ChatSession).where(ChatSession.id == session_id))


class MessageRepository(_Repo):
    async def append(
        self,
        session_id: int,
        role: str,
        content: str,
        token_start: int = 0,
        token_end: int = 0,
        meta: dict[str, Any] | None = None,
    ) -> Message:
        """Append a message with the next ordinal; advances the session's ``token_count`` to
        ``token_end`` when that is larger. Concurrent appenders to one session must be serialized
        (use a memory writer for the session: the unique (session, ordinal) constraint makes a
        racing append fail rather than interleave)."""
        q = select(func.coalesce(func.max(Message.ordinal), -1)).where(Message.session_id == session_id)
        ordinal = int((await self.session.execute(q)).scalar_one()) + 1
        msg = Message(
            session_id=session_id,
            ordinal=ordinal,
            role=role,
            content=content,
            token_start=token_start,
            token_end=token_end,
            meta=meta or {},
        )
        self.session.add(msg)
        sess = await self.session.get(ChatSession, session_id)
        if sess is None:
            raise NotFoundError(f"sessions {session_id} not found")
        sess.token_count = max(sess.token_count or 0, token_end)
        await self.session.flush()
        return msg

    async def history(self, session_id: int, *, limit: int = 50, before: int | None = None) -> list[Message]:
        """A page of messages in chronological order: the ``limit`` latest with ordinal < ``before``
        (all when None). Page backwards by passing the first returned ordinal as ``before``."""
        q = select(Message).where(Message.session_id == session_id)
        if before is not None:
            q = q.where(Message.ordinal < before)
        rows = (await self.session.execute(q.order_by(Message.ordinal.desc()).limit(limit))).scalars().all()
        return list(reversed(rows))

    async def count(self, session_id: int) -> int:
        q = select(func.count()).select_from(Message).where(Message.session_id == session_id)
        return int((await self.session.execute(q)).scalar_one())


class BlockRepository(_Repo):
    """Rows of ``memory_blocks``; writes go through :class:`memllm_storage.writer.OwnerWriter`."""

    def _owned(self, owner: Owner, q: Select) -> Select:
        return q.where(getattr(MemoryBlockRow, owner.column) == owner.id)

    async def list(self, owner: Owner, *, after_id: int = 0) -> Sequence[MemoryBlockRow]:
        q = self._owned(owner, select(MemoryBlockRow)).where(MemoryBlockRow.id > after_id)
        return (await self.session.execute(q.order_by(MemoryBlockRow.id))).scalars().all()

    async def ids_for_document(self, document_id: int) -> list[tuple[int, int]]:
        """(block id, representatives) of a document's blocks."""
        q = select(MemoryBlockRow.id, MemoryBlockRow.n_representatives).where(MemoryBlockRow.document_id == document_id)
        return [(int(i), int(r)) for i, r in (await self.session.execute(q)).all()]

    async def fingerprint(self, owner: Owner) -> tuple[int, int, int, str]:
        """(count, max id, total representatives, min payload file): changes whenever the owner's
        committed block set or their payload files change (ids are never reused)."""
        q = self._owned(
            owner,
            select(
                func.count(MemoryBlockRow.id),
                func.coalesce(func.max(MemoryBlockRow.id), 0),
                func.coalesce(func.sum(MemoryBlockRow.n_representatives), 0),
                func.coalesce(func.min(MemoryBlockRow.payload_file), ""),
            ),
        )
        c, m, r, f = (await self.session.execute(q)).one()
        return int(c), int(m), int(r), str(f)

    async def provenance(self, block_ids: Sequence[int]) -> dict[int, MemoryBlockRow]:
        q = select(MemoryBlockRow).where(MemoryBlockRow.id.in_([int(i) for i in block_ids]))
        return {r.id: r for r in (await self.session.execute(q)).scalars()}


class IndexStateRepository(_Repo):
    async def list(self, owner: Owner) -> dict[int, IndexState]:
        q = select(IndexState).where(getattr(IndexState, owner.column) == owner.id)
        return {r.layer: r for r in (await self.session.execute(q)).scalars()}

    async def put(self, owner: Owner, files: dict[int, str], vector_count: int, id_checksum: int) -> None:
        """Record, for every layer in ``files`` (layer -> index file), the vector count and id-set
        checksum its index holds after a write (one query for all layers)."""
        rows = await self.list(owner)
        for layer, file in files.items():
            row = rows.get(layer)
            if row is None:
                row = IndexState(layer=layer, file=file, **owner.owner_values())
                self.session.add(row)
            row.file, row.vector_count, row.id_checksum = file, vector_count, id_checksum
        row.updated_at = dt.datetime.now(dt.timezone.utc)
        await self.session.flush()


__all__ = [
    "ApiKeyRepository",
    "BlockRepository",
    "ChunkRepository",
    "DocumentRepository",
    "IndexStateRepository",
    "KnowledgeBaseRepository",
    "MessageRepository",
    "NotFoundError",
    "SessionRepository",
    "TenantRepository",
    "hash_api_key",
    "models",
]

"""Deleting forgets everywhere: rows and vectors at once, payload bytes at compaction."""

from __future__ import annotations

import numpy as np
from sqlalchemy import func, select
from storage_helpers import LAYOUT, doc_blocks, ingest_doc, make_block, store_for

from memllm_storage import Owner
from memllm_storage.models import Chunk, IndexState, MemoryBlockRow
from memllm_storage.repositories import KnowledgeBaseRepository, SessionRepository


async def test_delete_document_then_compact(store, migrated, tmp_path):
    async with store.sessions() as s:
        kb = (await KnowledgeBaseRepository(s).create("kb")).id
        await s.commit()
    doc_ids = [await ingest_doc(store, kb, n) for n in range(3)]
    src = await store.open_source(Owner.kb(kb))
    victim = doc_blocks(1)[1]
    planted = [victim.representatives[slot, 0][None] * 100 for slot in range(LAYOUT.n_layers)]
    victim_id = src.search(0, planted[0], 1)[1][0, 0]
    assert src.block_info([victim_id])[0].document_id == doc_ids[1]
    size_before = sum(p.stat().st_size for p in src.directory.glob("payload-*"))

    async with store.writer(Owner.kb(kb)) as w:
        assert await w.delete_document(doc_ids[1])
    # rows gone
    async with store.sessions() as s:
        assert (
            await s.scalar(
                select(func.count()).select_from(MemoryBlockRow).where(MemoryBlockRow.document_id == doc_ids[1])
            )
            == 0
        )
        assert await s.scalar(select(func.count()).select_from(Chunk).where(Chunk.document_id == doc_ids[1])) == 0
        states = (await s.execute(select(IndexState).where(IndexState.knowledge_base_id == kb))).scalars().all()
        assert {st.vector_count for st in states} == {6 * LAYOUT.representatives}
    # vectors gone at once: the planted query finds no block of the deleted document
    for slot, layer in enumerate(LAYOUT.layers):
        assert src.indexes.indexes[slot].ntotal == 6 * LAYOUT.representatives
        _, ids = src.search(layer, planted[slot], 10)
        assert victim_id not in ids[0].tolist()
        assert all(src.block_info([i])[0].document_id != doc_ids[1] for i in ids[0] if i >= 0)
    # bytes still on disk until compaction
    victim_bytes = victim.keys.tobytes()[:256]
    assert any(victim_bytes in p.read_bytes() for p in src.directory.glob("payload-*"))
    report = await store.compact(Owner.kb(kb))
    assert report.live_blocks == 6 and report.bytes_after < size_before
    files = list(src.directory.glob("payload-*"))
    assert len(files) == 1 and files[0].stat().st_size == report.bytes_after
    assert not any(victim_bytes in p.read_bytes() for p in files)
    # the rest still reads back exactly (checksums re-verified on the moved records)
    for n in (0, 2):
        for blk in doc_blocks(n):
            hit = src.search(2, blk.representatives[1, 0][None] * 100, 1)[1][0, 0]
            np.testing.assert_array_equal(src.fetch(2, np.array([hit])).values[0], blk.values[1])
    # and after a restart
    await store.close()
    other = store_for(*migrated, tmp_path / "data")
    try:
        src2 = await other.open_source(Owner.kb(kb))
        assert src2.indexes.last_open_report == {0: "ok", 2: "ok"}
        assert victim_id not in src2.search(0, planted[0], 10)[1][0].tolist()
        assert src2.num_blocks() == 6
    finally:
        await other.close()


async def test_replace_document_forgets_old_version(store):
    async with store.sessions() as s:
        kb = (await KnowledgeBaseRepository(s).create("kb")).id
        await s.commit()
    old_id = await ingest_doc(store, kb, 0)
    src = await store.open_source(Owner.kb(kb))
    old_blk = doc_blocks(0)[0]
    new = [make_block(555 + i, start=16 * i) for i in range(2)]
    async with store.writer(Owner.kb(kb)) as w:
        doc, old = await w.replace_document(kb, "doc-0.txt", sha256="f" * 64, status="ready")
        await w.add_blocks(new, document_id=doc.id)
    assert old.id == old_id and doc.id != old_id and src.num_blocks() == 2
    _, ids = src.search(0, old_blk.representatives[0, 0][None] * 100, 5)
    assert {src.block_info([i])[0].document_id for i in ids[0] if i >= 0} == {doc.id}


async def test_delete_session_and_kb_remove_everything(store):
    async with store.sessions() as s:
        sess = (await SessionRepository(s).create("chat")).id
        kb = (await KnowledgeBaseRepository(s).create("kb")).id
        await s.commit()
    async with store.writer(Owner.session(sess), LAYOUT) as w:
        msg = await w.messages.append(sess, "user", "hello", 0, 16)
        await w.add_blocks([make_block(1)], message_ids=[msg.id])
    await ingest_doc(store, kb, 0)
    s_src = await store.open_source(Owner.session(sess))
    k_src = await store.open_source(Owner.kb(kb))
    s_dir, k_dir = s_src.directory, k_src.directory
    assert s_dir.exists() and k_dir.exists()
    assert await store.delete_owner(Owner.session(sess))
    assert await store.delete_owner(Owner.kb(kb))
    assert not s_dir.exists() and not k_dir.exists()
    assert s_src.num_blocks() == 0 and k_src.num_blocks() == 0
    assert s_src.search(0, make_block(1).representatives[0, :1], 3)[1].max() == -1
    async with store.sessions() as s:
        assert await s.scalar(select(func.count()).select_from(MemoryBlockRow)) == 0
        assert await s.scalar(select(func.count()).select_from(IndexState)) == 0
    assert not await store.delete_owner(Owner.kb(kb))

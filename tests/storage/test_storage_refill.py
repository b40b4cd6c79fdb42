"""What the knowledge service's ingestion and deletion rely on, on SQLite and PostgreSQL: a document
refilled in place (same id), a refill of a deleted document writing nothing, the unique-name race
surfacing as IntegrityError, compaction once most payload bytes are dead, orphan directories swept."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from storage_helpers import LAYOUT, doc_blocks, ingest_doc

from memllm_storage import Owner
from memllm_storage.models import Chunk, KnowledgeBase, MemoryBlockRow
from memllm_storage.repositories import DocumentRepository, KnowledgeBaseRepository


async def _kb(store, name: str = "kb") -> int:
    async with store.sessions() as s:
        kb = (await KnowledgeBaseRepository(s).create(name)).id
        await s.commit()
    return kb


async def _count(store, model, **where) -> int:
    async with store.sessions() as s:
        q = select(func.count()).select_from(model)
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return int(await s.scalar(q))


async def test_refill_keeps_the_id_and_replaces_chunks_blocks_and_vectors(store):
    kb = await _kb(store)
    doc_id = await ingest_doc(store, kb, 1)
    src = await store.open_source(Owner.kb(kb))
    old_blocks = set(src.block_ids().tolist())
    async with store.writer(Owner.kb(kb)) as w:
        doc = await w.refill_document(doc_id, sha256="f" * 64, status="ready")
        assert doc is not None and doc.id == doc_id
        await w.add_blocks(doc_blocks(2, 2), document_id=doc_id)
    live = set(src.block_ids().tolist())
    assert len(live) == 2 and not live & old_blocks
    assert await _count(store, Chunk, document_id=doc_id) == 0
    assert await _count(store, MemoryBlockRow, document_id=doc_id) == 2


async def test_refill_of_a_deleted_document_writes_nothing(store):
    kb = await _kb(store)
    doc_id = await ingest_doc(store, kb, 1)
    async with store.writer(Owner.kb(kb)) as w:
        assert await w.delete_document(doc_id)
    async with store.writer(Owner.kb(kb)) as w:
        assert await w.refill_document(doc_id, status="ready") is None
    assert await _count(store, MemoryBlockRow) == 0


async def test_a_second_row_of_one_name_is_an_integrity_error(store):
    kb = await _kb(store)
    async with store.sessions() as a, store.sessions() as b:
        await DocumentRepository(a).create(kb, "x.txt", sha256="0" * 64)
        await a.commit()
        with pytest.raises(IntegrityError):
            await DocumentRepository(b).create(kb, "x.txt", sha256="1" * 64)


async def test_compaction_starts_once_half_the_payload_is_dead(store):
    kb = await _kb(store)
    owner = Owner.kb(kb)
    ids = [await ingest_doc(store, kb, n) for n in range(4)]
    async with store.writer(owner) as w:
        await w.delete_document(ids[0])
    assert await store.compact_if_wasteful(owner) is None  # a quarter dead: left alone
    async with store.writer(owner) as w:
        await w.delete_document(ids[1])
        await w.delete_document(ids[2])
    live, files = store.payload_usage(owner)
    report = await store.compact_if_wasteful(owner)
    assert report is not None and report.bytes_after == live < files / 2
    assert store.payload_usage(owner) == (live, live)
    src = await store.open_source(owner)
    assert len(src.block_ids()) == 3 and src.block_info(src.block_ids())[0].document_id == ids[3]
    assert LAYOUT.n_layers == len(src.layout.layers)


async def test_orphan_directories_of_deleted_owners_are_removed(store):
    kept, gone = await _kb(store, "kept"), await _kb(store, "gone")
    await ingest_doc(store, kept, 1)
    await ingest_doc(store, gone, 2)
    async with store.sessions() as s:  # the delete committed, its process died before the rmtree
        await s.delete(await s.get(KnowledgeBase, gone))
        await s.commit()
    removed = await store.remove_orphan_directories()
    assert removed == [Owner.kb(gone).directory(store.data_dir)]
    assert not Owner.kb(gone).directory(store.data_dir).exists()
    assert Owner.kb(kept).directory(store.data_dir).is_dir()

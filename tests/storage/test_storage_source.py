from __future__ import annotations

import numpy as np
import pytest
from storage_helpers import LAYOUT, doc_blocks, ingest_doc, make_block, store_for

from memllm.memory.source import InMemorySource, MemorySource, MemoryView, WritableMemorySource, split_view_id
from memllm_storage import LayoutMismatchError, Owner
from memllm_storage.repositories import KnowledgeBaseRepository, SessionRepository
from memllm_storage.source import PENDING_BASE


async def _kb(store, name="kb") -> int:
    async with store.sessions() as s:
        kb = await KnowledgeBaseRepository(s).create(name)
        await s.commit()
        return kb.id


async def _session(store, name="chat") -> int:
    async with store.sessions() as s:
        row = await SessionRepository(s).create(name)
        await s.commit()
        return row.id


def _assert_same_as_reference(ref: InMemorySource, src, id_map: dict[int, int], seed: int = 0) -> None:
    """Search and fetch results of ``src`` equal the reference's, with ids mapped ref -> src."""
    rng = np.random.default_rng(seed)
    for layer in LAYOUT.layers:
        q = rng.standard_normal((5, LAYOUT.search_dim)).astype(np.float32)
        rs, ri = ref.search(layer, q, 4)
        ps, pi = src.search(layer, q, 4)
        np.testing.assert_allclose(ps, rs, rtol=1e-6)
        assert (pi == np.vectorize(id_map.get)(ri)).all()
        ref_ids = np.array(sorted(id_map), np.int64)
        a = ref.fetch(layer, ref_ids)
        b = src.fetch(layer, np.array([id_map[i] for i in ref_ids], np.int64))
        np.testing.assert_array_equal(a.keys, b.keys)
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.lengths, b.lengths)
        np.testing.assert_array_equal(a.spans, b.spans)


async def test_persistent_source_matches_in_memory_source(store, migrated, tmp_path):
    kb = await _kb(store)
    blocks = [make_block(i, start=16 * i, length=16 if i % 3 else 9) for i in range(12)]
    ref = InMemorySource(LAYOUT)
    ref_ids = [ref.add(b) for b in blocks]
    async with store.writer(Owner.kb(kb), LAYOUT) as w:
        ids = await w.add_blocks(blocks[:7])
    async with store.writer(Owner.kb(kb)) as w:
        ids += await w.add_blocks(blocks[7:])
    src = await store.open_source(Owner.kb(kb))
    assert isinstance(src, MemorySource) and isinstance(src, WritableMemorySource)
    assert src.num_blocks() == 12 and len(set(ids)) == 12
    id_map = dict(zip(ref_ids, ids, strict=True))
    _assert_same_as_reference(ref, src, id_map)
    with pytest.raises(KeyError):
        src.fetch(0, np.array([max(ids) + 100]))

    # a fresh process (new store) reads the same from disk
    await store.close()
    other = store_for(*migrated, tmp_path / "data")
    try:
        src2 = await other.open_source(Owner.kb(kb))
        assert src2.indexes.last_open_report == {0: "ok", 2: "ok"}
        _assert_same_as_reference(ref, src2, id_map)
    finally:
        await other.close()


async def test_memory_view_over_persistent_and_in_memory(store):
    kb1, kb2, sess = await _kb(store, "a"), await _kb(store, "b"), await _session(store)
    for owner, base in ((Owner.kb(kb1), 100), (Owner.kb(kb2), 200), (Owner.session(sess), 300)):
        async with store.writer(owner, LAYOUT) as w:
            await w.add_blocks([make_block(base + i, start=16 * i) for i in range(4)])
    ctx = InMemorySource(LAYOUT)
    for i in range(3):
        ctx.add(make_block(400 + i, start=16 * i))
    sources = [
        ctx,
        await store.open_source(Owner.session(sess)),
        await store.open_source(Owner.kb(kb1)),
        await store.open_source(Owner.kb(kb2)),
    ]
    view = MemoryView(sources)
    assert view.num_blocks() == 3 + 4 + 4 + 4
    # plant: the query equals a representative of block 2 of kb2
    target = make_block(202, start=32)
    q = target.representatives[1, 3][None, :] * 10
    _scores, ids = view.search(2, q, 3)
    src_idx, _local = split_view_id(ids[0, 0])
    assert src_idx == 3
    got = view.fetch(2, ids[0, :1])
    np.testing.assert_array_equal(got.keys[0, :, :16], target.keys[1])
    assert tuple(got.spans[0]) == (32, 48)
    # isolation: the session source never returns kb blocks
    _s_scores, s_ids = sources[1].search(2, q, 10)
    assert set(s_ids[0][s_ids[0] >= 0].tolist()) <= set(sources[1].block_ids().tolist())


async def test_staged_blocks_commit_and_discard(store, migrated, tmp_path):
    sess = await _session(store)
    async with store.writer(Owner.session(sess), LAYOUT) as w:
        await w.add_blocks([make_block(1)])
    src = await store.open_source(Owner.session(sess))
    staged = make_block(2, start=16)
    pid = src.add(staged)
    assert pid >= PENDING_BASE and src.num_blocks() == 2
    q = staged.representatives[0, 0][None] * 10
    assert src.search(0, q, 1)[1][0, 0] == pid
    np.testing.assert_array_equal(src.fetch(0, np.array([pid])).keys[0], staged.keys[0])
    mapping = await src.commit_pending()
    real = mapping[pid]
    assert real < PENDING_BASE and src.num_blocks() == 2
    assert src.search(0, q, 2)[1][0].tolist()[0] == real
    src.add(make_block(3, start=32))
    src.discard_pending()
    assert src.num_blocks() == 2
    await store.close()
    other = store_for(*migrated, tmp_path / "data")
    try:
        src2 = await other.open_source(Owner.session(sess))
        assert src2.num_blocks() == 2 and src2.search(0, q, 1)[1][0, 0] == real
    finally:
        await other.close()


async def test_other_process_sees_commits_and_deletions_after_refresh(store, migrated, tmp_path):
    kb = await _kb(store)
    await ingest_doc(store, kb, 0)
    reader_store = store_for(*migrated, tmp_path / "data")
    try:
        reader = await reader_store.open_source(Owner.kb(kb))
        assert reader.num_blocks() == 3
        doc1 = await ingest_doc(store, kb, 1)
        planted = doc_blocks(1)[2].representatives[0, 1][None] * 10
        assert reader.num_blocks() == 3  # not yet refreshed: only committed state seen at last refresh
        assert await reader.refresh() is True
        assert await reader.refresh() is False
        assert reader.num_blocks() == 6
        hit = reader.search(0, planted, 1)[1][0, 0]
        assert reader.block_info([hit])[0].document_id == doc1
        async with store.writer(Owner.kb(kb)) as w:
            assert await w.delete_document(doc1)
        await reader.refresh()
        assert reader.num_blocks() == 3
        ids = reader.search(0, planted, 3)[1][0]
        assert hit not in ids.tolist()
        assert all(reader.block_info([i])[0].document_id != doc1 for i in ids if i >= 0)
    finally:
        await reader_store.close()


async def test_failed_write_leaves_nothing(store):
    kb = await _kb(store)
    await ingest_doc(store, kb, 0)
    src = await store.open_source(Owner.kb(kb))
    payload = next(src.directory.glob("payload-*.bin"))
    size = payload.stat().st_size
    with pytest.raises(RuntimeError, match="boom"):
        async with store.writer(Owner.kb(kb)) as w:
            doc, _ = await w.replace_document(kb, "x.txt", sha256="0" * 64, status="ready")
            await w.add_blocks(doc_blocks(5), document_id=doc.id)
            assert payload.stat().st_size > size
            raise RuntimeError("boom")
    assert payload.stat().st_size == size
    assert src.num_blocks() == 3
    async with store.sessions() as s:
        from memllm_storage.repositories import DocumentRepository

        assert [d.source_name for d in await DocumentRepository(s).list(kb)] == ["doc-0.txt"]
    planted = doc_blocks(5)[0].representatives[0, 0][None] * 10
    assert set(src.search(0, planted, 5)[1][0].tolist()) - {-1} <= set(src.block_ids().tolist())


async def test_layout_is_fixed_by_first_write(store):
    kb = await _kb(store)
    await ingest_doc(store, kb, 0)
    other = type(LAYOUT)(layers=(0, 1), n_kv_heads=2, head_dim=8, block_size=16, representatives=4)
    with pytest.raises(LayoutMismatchError):
        async with store.writer(Owner.kb(kb), other):
            pass
    with pytest.raises(ValueError, match="do not fit"):
        async with store.writer(Owner.kb(kb)) as w:
            misfit = type(LAYOUT)(layers=(0, 2), n_kv_heads=2, head_dim=4, block_size=16, representatives=4)
            await w.add_blocks([make_block(1, layout=misfit)])


async def test_int8_payloads_round_trip_within_quantization_error(migrated, tmp_path):
    store = store_for(*migrated, tmp_path / "data8", payload_dtype="int8")
    try:
        kb = await _kb(store)
        blocks = [make_block(i, start=16 * i) for i in range(3)]
        async with store.writer(Owner.kb(kb), LAYOUT) as w:
            ids = await w.add_blocks(blocks)
        src = await store.open_source(Owner.kb(kb))
        for slot, layer in enumerate(LAYOUT.layers):
            got = src.fetch(layer, np.array(ids))
            for j, b in enumerate(blocks):
                ref = b.keys[slot].astype(np.float32)
                err = np.abs(got.keys[j].astype(np.float32) - ref).max(axis=-1)
                assert (err <= np.abs(ref).max(axis=-1) / 127 * 0.51 + 2e-3).all()
        size8 = sum(p.stat().st_size for p in src.directory.glob("payload-*"))
        assert size8 < 0.75 * 3 * (2 * LAYOUT.bytes_per_token() * 16)  # well under float16 size
    finally:
        await store.close()

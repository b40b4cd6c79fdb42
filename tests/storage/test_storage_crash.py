"""Crash safety: a child writing blocks is SIGKILLed at named points; a restart must find rows,
payload files and indexes consistent, every document fully present or fully absent, search working."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import func, select
from storage_helpers import LAYOUT, doc_blocks, ingest_doc, store_for

from memllm_storage import Owner
from memllm_storage.index_files import load_index
from memllm_storage.models import Chunk, Document, MemoryBlockRow
from memllm_storage.repositories import KnowledgeBaseRepository

HERE = Path(__file__).parent
ROOT = HERE.parents[1]

# (crash point, hits to let pass, documents committed when it fires) for the "ingest" scenario
# (3 documents of 3 blocks each, indexes saved after every commit: 2 layer files per commit).
INGEST_POINTS = [
    ("payload.before_append", 3, 1),  # first block of doc-1, nothing written
    ("payload.mid_record", 4, 1),  # half of doc-1's second record on disk
    ("writer.before_commit", 1, 1),  # doc-1's payloads synced, rows flushed, not committed
    ("writer.after_commit", 1, 2),  # doc-1 committed, indexes neither updated nor saved
    ("index.mid_save", 2, 2),  # doc-1 committed, layer-0 temp file half written
    ("index.before_replace", 3, 2),  # doc-1 committed, layer-0 saved, layer-2 temp file not renamed
]


def _run_child(url: str, schema: str | None, data_dir: Path, kb: int, scenario: str, point: str, skip: int) -> None:
    env = dict(
        os.environ,
        MEMLLM_CRASHPOINT=point,
        MEMLLM_CRASHPOINT_SKIP=str(skip),
        MEMLLM_CRASHPOINT_ACTION="pause",
        PYTHONPATH=os.pathsep.join(map(str, (ROOT, ROOT / "storage", HERE))),
    )
    child = subprocess.Popen(
        [sys.executable, str(HERE / "crash_child.py"), url, schema or "-", str(data_dir), str(kb), scenario],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    try:
        line = child.stdout.readline()
        assert line.strip() == f"CRASHPOINT {point}", f"child did not stop at {point}: {line!r} {child.stderr.read()}"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


async def _check_consistent(store, kb: int, expect_docs: list[int]) -> dict[int, str]:
    """Restart-side checks; returns the index open report."""
    owner = Owner.kb(kb)
    src = await store.open_source(owner)
    report = dict(src.indexes.last_open_report)
    async with store.sessions() as s:
        docs = (await s.execute(select(Document).where(Document.knowledge_base_id == kb))).scalars().all()
        assert sorted(d.source_name for d in docs) == sorted(f"doc-{n}.txt" for n in expect_docs)
        for d in docs:
            assert d.status == "ready"
            n_chunks = await s.scalar(select(func.count()).select_from(Chunk).where(Chunk.document_id == d.id))
            n_blocks = await s.scalar(
                select(func.count()).select_from(MemoryBlockRow).where(MemoryBlockRow.document_id == d.id)
            )
            assert (n_chunks, n_blocks) == (3, 3), f"partial document {d.source_name}"
        rows = (await s.execute(select(MemoryBlockRow).where(MemoryBlockRow.knowledge_base_id == kb))).scalars().all()
    assert sorted(r.id for r in rows) == src.block_ids().tolist()
    assert all(r.document_id is not None for r in rows)
    for slot, layer in enumerate(LAYOUT.layers):
        assert src.indexes.summary(slot) == src.committed_summary()
        on_disk = load_index(src.indexes.path(slot), 1 << 40, expect_layer=layer)
        assert on_disk[1:] == src.committed_summary(), "index file not brought up to date after open"
    assert not list(src.directory.glob("*.tmp-*"))
    by_doc = {d.source_name: d.id for d in docs}
    for n in expect_docs:
        doc_id = by_doc[f"doc-{n}.txt"]
        for blk in doc_blocks(n):
            for slot, layer in enumerate(LAYOUT.layers):
                hit = src.search(layer, blk.representatives[slot, 2][None] * 10, 1)[1][0, 0]
                info = src.block_info([hit])[0]
                assert info.document_id == doc_id and info.token_start == blk.token_start
                np.testing.assert_array_equal(src.fetch(layer, np.array([hit])).keys[0], blk.keys[slot])
    return report


async def _new_kb(url, schema, data_dir) -> int:
    store = store_for(url, schema, data_dir)
    try:
        async with store.sessions() as s:
            kb = await KnowledgeBaseRepository(s).create("crash")
            await s.commit()
            return kb.id
    finally:
        await store.close()


@pytest.mark.parametrize(("point", "skip", "committed"), INGEST_POINTS, ids=[p[0] for p in INGEST_POINTS])
async def test_crash_during_ingest(migrated, tmp_path, point, skip, committed):
    url, schema = migrated
    data_dir = tmp_path / "data"
    kb = await _new_kb(url, schema, data_dir)
    _run_child(url, schema, data_dir, kb, "ingest", point, skip)

    store = store_for(url, schema, data_dir)
    try:
        report = await _check_consistent(store, kb, list(range(committed)))
        if point in ("writer.after_commit", "index.mid_save"):
            assert "repaired" in report.values(), report  # files lagged behind the committed rows
        assert set(report.values()) <= {"ok", "repaired"}
        # the next write truncates orphan payload bytes and works normally
        await ingest_doc(store, kb, 7)
        src = await store.open_source(Owner.kb(kb))
        files = list(src.directory.glob("payload-*.bin"))
        assert len(files) == 1
        assert files[0].stat().st_size == sum(e.length for e in src._blocks.values())
        await _check_consistent(store, kb, [*range(committed), 7])
    finally:
        await store.close()
    store = store_for(url, schema, data_dir)  # and once more from disk, now clean
    try:
        assert set((await _check_consistent(store, kb, [*range(committed), 7])).values()) == {"ok"}
    finally:
        await store.close()


@pytest.mark.parametrize("point", ["compaction.after_copy", "compaction.after_commit"])
async def test_crash_during_compaction(migrated, tmp_path, point):
    url, schema = migrated
    data_dir = tmp_path / "data"
    kb = await _new_kb(url, schema, data_dir)
    _run_child(url, schema, data_dir, kb, "compact", point, 0)
    store = store_for(url, schema, data_dir)
    try:
        await _check_consistent(store, kb, [0, 2])
        src = await store.open_source(Owner.kb(kb))
        assert len(list(src.directory.glob("payload-*.bin"))) == 2  # old + new, one unreferenced
        report = await store.compact(Owner.kb(kb))
        files = list(src.directory.glob("payload-*.bin"))
        assert len(files) == 1 and files[0].stat().st_size == report.bytes_after
        assert report.bytes_after == sum(e.length for e in src._blocks.values())
        await _check_consistent(store, kb, [0, 2])
    finally:
        await store.close()


async def test_corrupt_or_missing_index_file_is_rebuilt(store, migrated, tmp_path):
    async with store.sessions() as s:
        kb = (await KnowledgeBaseRepository(s).create("kb")).id
        await s.commit()
    for n in range(3):
        await ingest_doc(store, kb, n)
    src = await store.open_source(Owner.kb(kb))
    layer0, layer2 = src.indexes.path(0), src.indexes.path(1)
    await store.close()
    data = bytearray(layer0.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 64):
        data[i] ^= 0xFF
    layer0.write_bytes(bytes(data))
    layer2.unlink()
    other = store_for(*migrated, tmp_path / "data")
    try:
        report = await _check_consistent(other, kb, [0, 1, 2])
        assert report[0].startswith("rebuilt:") and "crc32" in report[0]
        assert report[2] == "rebuilt: missing"
    finally:
        await other.close()


async def test_two_processes_write_one_owner_concurrently(migrated, tmp_path):
    """Writers in two processes to the same knowledge base are serialized; nothing is lost."""
    url, schema = migrated
    data_dir = tmp_path / "data"
    kb = await _new_kb(url, schema, data_dir)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, (ROOT, ROOT / "storage", HERE))))
    env.pop("MEMLLM_CRASHPOINT", None)
    children = [
        subprocess.Popen(
            [
                sys.executable,
                str(HERE / "crash_child.py"),
                url,
                schema or "-",
                str(data_dir),
                str(kb),
                f"ingest:{first}:4",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for first in (0, 10)
    ]
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0 and "DONE" in out, err
    store = store_for(url, schema, data_dir)
    try:
        report = await _check_consistent(store, kb, [0, 1, 2, 3, 10, 11, 12, 13])
        assert set(report.values()) == {"ok"}
        src = await store.open_source(Owner.kb(kb))
        spans = sorted((e.offset, e.offset + e.length) for e in src._blocks.values())
        assert all(a[1] <= b[0] for a, b in itertools.pairwise(spans))  # no overlapping records
    finally:
        await store.close()

"""``memllm bench storage``: what the persistence layer costs.

Measures (CPU figures, noisy on a shared machine):

* block write throughput through ``MemoryStore.writer`` (SmolLM2 geometry: 30 memory layers,
  3 kv heads x 64, 128-token blocks, 4 representatives), float16 and int8 payloads;
* bytes on disk per memory token (payload + index files + database rows);
* ``BlockIndex`` add time and search latency (1 query and 16 queries, top-16) at each size, flat and
  IVF, and IVF recall@16 against flat (clustered synthetic vectors, queries near stored ones);
* restart time of an owner with N indexed vectors (one memory layer): open from valid files, and
  rebuild from payloads after the index file is lost.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from memllm.memory.faiss_index import BlockIndex
from memllm.memory.types import BlockLayout, MemoryBlock

SMOLLM2 = BlockLayout(layers=tuple(range(30)), n_kv_heads=3, head_dim=64, block_size=128, representatives=4)


def _clustered(n: int, dim: int, rng: np.random.Generator, n_clusters: int = 1000) -> np.ndarray:
    centers = rng.standard_normal((n_clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    step = 262_144
    for s in range(0, n, step):
        m = min(step, n - s)
        out[s : s + m] = centers[rng.integers(0, n_clusters, m)] + 0.5 * rng.standard_normal((m, dim), np.float32)
    return out


def _block(layout: BlockLayout, rng: np.random.Generator, start: int, reps: np.ndarray | None = None) -> MemoryBlock:
    shape = (layout.n_layers, layout.n_kv_heads, layout.block_size, layout.head_dim)
    kv = rng.standard_normal(shape, dtype=np.float32).astype(np.float16)
    if reps is None:
        reps = rng.standard_normal((layout.n_layers, layout.representatives, layout.search_dim), np.float32)
    return MemoryBlock(kv, kv, reps, start, start + layout.block_size)


async def _new_store(workdir: Path, name: str, **kw: Any):
    from memllm_storage import migrate
    from memllm_storage.engine import make_engine
    from memllm_storage.repositories import KnowledgeBaseRepository
    from memllm_storage.store import MemoryStore

    url = f"sqlite+aiosqlite:///{workdir / name}.db"
    engine = make_engine(url)
    await migrate.upgrade(engine)
    store = MemoryStore(engine, workdir / name, owns_engine=True, **kw)
    async with store.sessions() as s:
        kb = await KnowledgeBaseRepository(s).create("bench")
        await s.commit()
    return store, kb.id, url


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def bench_writes(workdir: Path, n_blocks: int, per_write: int, dtype: str) -> dict[str, Any]:
    from memllm_storage.owners import Owner

    store, kb, _ = await _new_store(workdir, f"writes-{dtype}", payload_dtype=dtype)
    rng = np.random.default_rng(0)
    blocks = [_block(SMOLLM2, rng, i * SMOLLM2.block_size) for i in range(per_write)]
    t0 = time.perf_counter()
    for w_no in range(n_blocks // per_write):
        async with store.writer(Owner.kb(kb), SMOLLM2) as w:
            for b in blocks:
                b.token_start += per_write * SMOLLM2.block_size * (w_no > 0)
                b.token_end = b.token_start + SMOLLM2.block_size
            await w.add_blocks(blocks)
    elapsed = time.perf_counter() - t0
    await store.close()
    tokens = n_blocks * SMOLLM2.block_size
    payload = sum(p.stat().st_size for p in (workdir / f"writes-{dtype}").rglob("payload-*"))
    total = _dir_bytes(workdir / f"writes-{dtype}") + (workdir / f"writes-{dtype}.db").stat().st_size
    return {
        "dtype": dtype,
        "blocks": n_blocks,
        "blocks_per_write": per_write,
        "seconds": elapsed,
        "blocks_per_s": n_blocks / elapsed,
        "tokens_per_s": tokens / elapsed,
        "payload_mb_per_s": payload / elapsed / 1e6,
        "payload_bytes_per_token": payload / tokens,
        "disk_bytes_per_token": total / tokens,
    }


def bench_index(n: int, dim: int, kind: str, flat_ids: dict[int, np.ndarray]) -> dict[str, Any]:
    rng = np.random.default_rng(n)  # same vectors and queries for flat and IVF of one size
    vecs = _clustered(n, dim, rng)
    ids = np.arange(n, dtype=np.int64) // 4  # 4 representatives per block
    index = BlockIndex(dim, ivf_threshold=(1 << 62) if kind == "flat" else n)
    t0 = time.perf_counter()
    batch = 65_536
    for s in range(0, n, batch):
        index.add(ids[s : s + batch], vecs[s : s + batch])
    add_s = time.perf_counter() - t0
    queries = vecs[rng.integers(0, n, 64)] + 0.3 * rng.standard_normal((64, dim), np.float32)
    index.search(queries[:1], 16)  # warm up
    t0 = time.perf_counter()
    for q in queries[:32]:
        index.search(q[None], 16)
    one = (time.perf_counter() - t0) / 32
    t0 = time.perf_counter()
    for s in range(0, 64, 16):
        _, got = index.search(queries[s : s + 16], 16)
    batch16 = (time.perf_counter() - t0) / 4
    _, got = index.search(queries, 16)
    row = {
        "vectors": n,
        "kind": index.kind,
        "add_s": add_s,
        "add_vectors_per_s": n / add_s,
        "search_1q_ms": one * 1e3,
        "search_16q_ms": batch16 * 1e3,
    }
    if kind == "flat":
        flat_ids[n] = got
    elif n in flat_ids:
        ref = flat_ids[n]
        hits = [len(set(a[a >= 0]) & set(b[b >= 0])) / max(1, (b >= 0).sum()) for a, b in zip(got, ref, strict=True)]
        row["recall_at_16_vs_flat"] = float(np.mean(hits))
    return row


async def bench_restart(workdir: Path, n_vectors: int, dim: int) -> dict[str, Any]:
    from memllm_storage.owners import Owner

    layout = BlockLayout(layers=(0,), n_kv_heads=dim // 64, head_dim=64, block_size=4, representatives=4)
    n_blocks = n_vectors // layout.representatives
    store, kb, url = await _new_store(workdir, "restart", checkpoint_fraction=1.0)
    rng = np.random.default_rng(1)
    reps = _clustered(n_blocks * 4, dim, rng).reshape(n_blocks, 1, 4, dim)
    t0 = time.perf_counter()
    per_write = 8192
    for s in range(0, n_blocks, per_write):
        async with store.writer(Owner.kb(kb), layout) as w:
            await w.add_blocks([_block(layout, rng, 4 * i, reps[i]) for i in range(s, min(n_blocks, s + per_write))])
    src = await store.open_source(Owner.kb(kb))
    src.indexes.checkpoint(force=True)
    fill_s = time.perf_counter() - t0
    kind = src.indexes.indexes[0].kind
    index_file = src.indexes.path(0)
    await store.close()

    async def reopen() -> tuple[float, dict[int, str]]:
        from memllm_storage.store import MemoryStore

        t = time.perf_counter()
        s2 = await MemoryStore.open(url, workdir / "restart")
        src2 = await s2.open_source(Owner.kb(kb))
        q = reps[7, 0, 1][None]
        assert src2.search(0, q, 1)[1][0, 0] == src2.block_ids()[7]
        took = time.perf_counter() - t
        report = dict(src2.indexes.last_open_report)
        await s2.close()
        return took, report

    warm_s, report_ok = await reopen()
    index_file.unlink()
    rebuild_s, report_rebuilt = await reopen()
    return {
        "vectors": n_vectors,
        "blocks": n_blocks,
        "index_kind": kind,
        "fill_s": fill_s,
        "restart_s": warm_s,
        "restart_report": report_ok[0],
        "restart_rebuild_s": rebuild_s,
        "rebuild_report": report_rebuilt[0],
        "index_file_mb": index_file.stat().st_size / 1e6,
    }


def run_storage_bench(
    sizes: list[int],
    *,
    restart_vectors: int,
    dim: int,
    out: Path,
    workdir: Path | None = None,
    write_blocks: int = 64,
    threads: int = 1,
) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="memllm-bench-", dir=workdir))
    results: dict[str, Any] = {"layout": {"layers": 30, "kv_heads": 3, "head_dim": 64, "block_size": 128}}
    try:
        results["writes"] = [asyncio.run(bench_writes(tmp, write_blocks, 16, d)) for d in ("float16", "int8")]
        import faiss

        faiss.omp_set_num_threads(threads)
        results["faiss_threads"] = threads
        flat_ids: dict[int, np.ndarray] = {}
        results["index"] = [bench_index(n, dim, kind, flat_ids) for n in sizes for kind in ("flat", "ivf")]
        results["restart"] = asyncio.run(bench_restart(tmp, restart_vectors, dim))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
    print_tables(results)
    print(f"\nwrote {out}")
    return results


def print_tables(r: dict[str, Any]) -> None:
    print("\nblock writes (SmolLM2 geometry, 30 layers, 128-token blocks, 16 blocks per commit)")
    print(f"{'dtype':8} {'blocks/s':>9} {'tokens/s':>10} {'MB/s':>8} {'payload B/tok':>14} {'disk B/tok':>11}")
    for w in r.get("writes", []):
        print(
            f"{w['dtype']:8} {w['blocks_per_s']:9.1f} {w['tokens_per_s']:10.0f} {w['payload_mb_per_s']:8.1f} "
            f"{w['payload_bytes_per_token']:14.0f} {w['disk_bytes_per_token']:11.0f}"
        )
    print(f"\nindex (dim 192, clustered vectors, top-16, faiss threads {r.get('faiss_threads')})")
    print(f"{'vectors':>9} {'kind':5} {'add s':>8} {'add vec/s':>10} {'1q ms':>8} {'16q ms':>8} {'recall@16':>10}")
    for x in r.get("index", []):
        rec = x.get("recall_at_16_vs_flat")
        print(
            f"{x['vectors']:9d} {x['kind']:5} {x['add_s']:8.2f} {x['add_vectors_per_s']:10.0f} "
            f"{x['search_1q_ms']:8.2f} {x['search_16q_ms']:8.2f} {'' if rec is None else f'{rec:10.3f}'}"
        )
    if "restart" in r:
        x = r["restart"]
        print(
            f"\nrestart with {x['vectors']} vectors ({x['index_kind']}, "
            f"{x['index_file_mb']:.0f} MB index file): "
            f"{x['restart_s']:.2f} s from files ({x['restart_report']}), {x['restart_rebuild_s']:.2f} s "
            f"rebuilding from payloads ({x['rebuild_report']}); fill took {x['fill_s']:.1f} s"
        )

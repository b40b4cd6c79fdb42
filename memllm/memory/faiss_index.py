"""A FAISS inner-product index over block representatives, keyed by int64 block ids.

Each block contributes ``R`` representative vectors that all carry the block's id; a search asks
FAISS for more neighbours than needed and keeps each block's best score, so callers get distinct
block ids. ``-1`` means "not found" (fewer blocks than ``k``).

Lifecycle: ``add`` and ``remove`` may interleave freely. Flat (exact) until the vector count passes
``ivf_threshold``; then ``maybe_upgrade`` trains an IVF-Flat index on the stored vectors and re-adds
them. IVF-Flat keeps the exact vectors, so scores stay exact and only recall is approximate; the flat
index is kept beside it as the source of truth for saving and rebuilding. faiss-gpu is used
when it is installed and a GPU is visible (checked once).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable

import faiss
import numpy as np

log = logging.getLogger(__name__)

# Observers of search latency (seconds), e.g. the server's Prometheus histogram; a server adds its
# own on start and removes it on stop (the list is mutated, never rebound).
SEARCH_OBSERVERS: list[Callable[[float], None]] = []


@functools.cache
def gpu_resources():
    """faiss GPU resources when faiss-gpu and a GPU are present, else None (logged once)."""
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if n > 0 and hasattr(faiss, "StandardGpuResources"):
        log.info("faiss: using GPU (%d visible)", n)
        return faiss.StandardGpuResources()
    log.info("faiss: using CPU indexes")
    return None


# Below this many (query, vector) pairs a search runs on one OpenMP thread: starting a team costs
# more than the search, ~8 ms against 0.01 ms for one query over 300 vectors while the model's
# threads keep the cores busy (ad-hoc timing, 2 cores, 2026-11-29); 1 thread still won at 40,000.
SINGLE_THREAD_PAIRS = 1_000_000


@contextlib.contextmanager
def _threads_for(pairs: int):
    """Run the enclosed FAISS call on one OpenMP thread when it is small (``pairs`` query x vector)."""
    if pairs > SINGLE_THREAD_PAIRS:
        yield
        return
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


class BlockIndex:
    """Inner-product index of representative vectors -> block ids (one per memory layer)."""

    def __init__(self, dim: int, ivf_threshold: int = 200_000, nprobe: int = 32) -> None:
        self.dim = dim
        self.ivf_threshold = ivf_threshold
        self.nprobe = nprobe
        self._flat = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))  # always exact, source for rescoring
        self._ivf: faiss.Index | None = None

    @property
    def ntotal(self) -> int:
        return int(self._flat.ntotal)

    @property
    def kind(self) -> str:
        return "ivf" if self._ivf is not None else "flat"

    def add(self, block_ids: np.ndarray, vectors: np.ndarray) -> None:
        """block_ids: (n,) int64; vectors: (n, dim) float32 (one row per representative)."""
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        block_ids = np.ascontiguousarray(block_ids, dtype=np.int64)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(block_ids) != len(vectors):
            raise ValueError(f"expected ({len(block_ids)}, {self.dim}) vectors, got {vectors.shape}")
        self._flat.add_with_ids(vectors, block_ids)
        if self._ivf is not None:
            self._ivf.add_with_ids(vectors, block_ids)
        self.maybe_upgrade()

    def remove(self, block_ids: np.ndarray) -> int:
        """Remove every vector of the given blocks; returns the number of vectors removed."""
        sel = faiss.IDSelectorBatch(np.ascontiguousarray(block_ids, dtype=np.int64))
        removed = int(self._flat.remove_ids(sel))
        if self._ivf is not None:
            self._ivf.remove_ids(sel)
        return removed

    def maybe_upgrade(self) -> None:
        if self._ivf is None and self.ntotal >= self.ivf_threshold:
            self._build_ivf()

    def _build_ivf(self) -> None:
        n = self.ntotal
        vectors = self._flat.index.reconstruct_n(0, n)
        ids = faiss.vector_to_array(self._flat.id_map).astype(np.int64)
        nlist = int(max(16, min(4 * np.sqrt(n), 65536)))
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        train = vectors[np.random.default_rng(0).choice(n, size=min(n, 64 * nlist), replace=False)]
        ivf.train(train)
        ivf.nprobe = self.nprobe
        index = faiss.IndexIDMap2(ivf)
        index.add_with_ids(vectors, ids)
        log.info("faiss: upgraded index of %d vectors to IVF (nlist=%d)", n, nlist)
        self._ivf = index

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries: (n, dim) float32 -> (scores (n, k) float32, block_ids (n, k) int64), best first.

        Block ids are distinct per row; missing entries are id -1 with score -inf.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(queries)
        out_scores = np.full((n, k), -np.inf, dtype=np.float32)
        out_ids = np.full((n, k), -1, dtype=np.int64)
        if self.ntotal == 0 or k <= 0:
            return out_scores, out_ids
        fetch = min(self.ntotal, k * 8)
        index = self._ivf if self._ivf is not None else self._flat
        t0 = time.perf_counter()
        with _threads_for(n * self.ntotal):
            scores, ids = index.search(queries, fetch)
        for observe in SEARCH_OBSERVERS:
            observe(time.perf_counter() - t0)
        for row in range(n):
            keep = ids[row] >= 0
            row_ids, row_scores = ids[row][keep], scores[row][keep]
            _, first = np.unique(row_ids, return_index=True)  # each block's best: rows come best first
            first = np.sort(first)[:k]
            out_ids[row, : len(first)] = row_ids[first]
            out_scores[row, : len(first)] = row_scores[first]
        return out_scores, out_ids

    _CONTAINER_MAGIC = b"MLBI"

    def to_bytes(self) -> bytes:
        """Serialise the index.

        Flat only: the plain faiss serialisation of the exact index. With an IVF index: a small
        container (``b"MLBI"``, u64 length of the flat part, flat part, IVF part) so loading does not
        retrain the IVF quantizer (minutes at a million vectors).
        """
        flat = faiss.serialize_index(self._flat).tobytes()
        if self._ivf is None:
            return flat
        ivf = faiss.serialize_index(self._ivf).tobytes()
        return self._CONTAINER_MAGIC + len(flat).to_bytes(8, "little") + flat + ivf

    @classmethod
    def from_bytes(cls, data: bytes, ivf_threshold: int = 200_000) -> BlockIndex:
        ivf_part = None
        if data[:4] == cls._CONTAINER_MAGIC:
            n_flat = int.from_bytes(data[4:12], "little")
            data, ivf_part = data[12 : 12 + n_flat], data[12 + n_flat :]
        flat = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        obj = cls(flat.d, ivf_threshold=ivf_threshold)
        obj._flat = faiss.IndexIDMap2.cast(flat) if not isinstance(flat, faiss.IndexIDMap2) else flat
        if ivf_part is not None and obj.ntotal >= ivf_threshold:
            ivf = faiss.deserialize_index(np.frombuffer(ivf_part, dtype=np.uint8))
            if ivf.ntotal == obj.ntotal:
                faiss.extract_index_ivf(ivf).nprobe = obj.nprobe
                obj._ivf = ivf
        obj.maybe_upgrade()
        return obj

"""Memory sources: where a forward pass finds blocks that left its local window.

``MemorySource`` is the read interface the engine uses; the in-memory source here holds the evicted
past of one input, and the storage layer implements the same protocol for sessions and knowledge
bases (persisted). ``MemoryView`` combines several sources into one, so a forward pass can read
"this input + session S + knowledge bases K1..Kn" without knowing where blocks live.

Block ids are int64 and unique within a source; a view makes them unique across sources by putting
the source's position in the top bits (``view_id = (source_index << 48) | block_id``). An id names
one payload for as long as its source lives, except *provisional* ids (``>= PROVISIONAL_BASE``
within a source): a writable source may give a staged block one and reuse it once the block is
committed or discarded (see :func:`stable_ids`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from memllm.memory.faiss_index import BlockIndex
from memllm.memory.types import BlockLayout, FetchedBlocks, MemoryBlock

SOURCE_SHIFT = 48
LOCAL_MASK = (1 << SOURCE_SHIFT) - 1
PROVISIONAL_BASE = 1 << (SOURCE_SHIFT - 1)  # ids from here up (within a source) may be reused


def stable_ids(ids: np.ndarray) -> np.ndarray:
    """bool mask of the (source or view) block ids that name one payload for their source's life."""
    return (np.asarray(ids, dtype=np.int64) & LOCAL_MASK) < PROVISIONAL_BASE


@runtime_checkable
class MemorySource(Protocol):
    """Read access to the blocks of one owner (or several, for a view)."""

    name: str
    layout: BlockLayout

    def num_blocks(self) -> int: ...

    def search(self, layer: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries: (n, Hkv*D) float32 at model layer ``layer``.

        Returns (scores (n, k) float32, block_ids (n, k) int64), best first, distinct ids per row,
        -1 / -inf where fewer than k blocks exist.
        """
        ...

    def fetch(self, layer: int, block_ids: np.ndarray) -> FetchedBlocks:
        """Payloads of ``block_ids`` (all >= 0) at model layer ``layer``, in the given order."""
        ...


@runtime_checkable
class WritableMemorySource(MemorySource, Protocol):
    def add(self, block: MemoryBlock) -> int:
        """Store a block; returns its id."""
        ...


def pad_block(arr: np.ndarray, block_size: int) -> np.ndarray:
    """(Hkv, n, D) -> (Hkv, block_size, D), zero padded."""
    n = arr.shape[1]
    if n == block_size:
        return arr
    out = np.zeros((arr.shape[0], block_size, arr.shape[2]), dtype=arr.dtype)
    out[:, :n] = arr
    return out


class InMemorySource:
    """Blocks held in process memory (the evicted past of the current input).

    Payloads live in one float16 arena per memory layer and kind, (capacity, Hkv, block_size, D),
    doubled when full, so a fetch is one gather. (Keeping each block as its own 1.5 MB array among
    a chunk's temporaries let glibc's heap grow to ~4x the payload; docs/RESULTS.md.) One
    ``BlockIndex`` per memory layer indexes the representatives.
    """

    def __init__(self, layout: BlockLayout, name: str = "context", ivf_threshold: int = 200_000) -> None:
        self.name = name
        self.layout = layout
        shape = (0, layout.n_kv_heads, layout.block_size, layout.head_dim)
        self._keys = np.zeros((len(layout.layers), *shape), dtype=np.float16)  # (Lm, capacity, Hkv, bs, D)
        self._values = np.zeros_like(self._keys)
        self._spans: list[tuple[int, int]] = []
        self._indexes = [BlockIndex(layout.search_dim, ivf_threshold) for _ in layout.layers]

    def num_blocks(self) -> int:
        return len(self._spans)

    def add(self, block: MemoryBlock) -> int:
        block_id = len(self._spans)
        lay = self.layout
        if block_id == self._keys.shape[1]:
            self._grow(max(16, 2 * block_id))
        n = block.keys.shape[2]
        self._keys[:, block_id, :, :n] = block.keys
        self._values[:, block_id, :, :n] = block.values
        for slot in range(lay.n_layers):
            reps = np.asarray(block.representatives[slot], dtype=np.float32)
            self._indexes[slot].add(np.full(len(reps), block_id, dtype=np.int64), reps)
        self._spans.append((block.token_start, block.token_end))
        return block_id

    def search(self, layer: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self._indexes[self.layout.layer_slot(layer)].search(queries, k)

    def fetch(self, layer: int, block_ids: np.ndarray) -> FetchedBlocks:
        slot = self.layout.layer_slot(layer)
        ids = np.asarray(block_ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= len(self._spans)):
            raise KeyError(f"unknown block ids {ids.tolist()} in source {self.name!r}")
        lay = self.layout
        if ids.size == 0:
            empty = np.zeros((0, lay.n_kv_heads, lay.block_size, lay.head_dim), dtype=np.float16)
            return FetchedBlocks(empty, empty.copy(), np.zeros(0, np.int64), np.zeros((0, 2), np.int64))
        keys = self._keys[slot, ids]  # a gather: a new array, later adds do not change it
        values = self._values[slot, ids]
        spans = np.array([self._spans[i] for i in ids], dtype=np.int64)
        return FetchedBlocks(keys, values, spans[:, 1] - spans[:, 0], spans)

    def spans(self, block_ids: np.ndarray) -> np.ndarray:
        return np.array([self._spans[i] for i in np.asarray(block_ids, dtype=np.int64)], dtype=np.int64)

    def _grow(self, capacity: int) -> None:
        """Reallocate the arenas with room for ``capacity`` blocks (rows past the count stay zero)."""
        for name in ("_keys", "_values"):
            old = getattr(self, name)
            new = np.zeros((old.shape[0], capacity, *old.shape[2:]), dtype=old.dtype)
            new[:, : old.shape[1]] = old
            setattr(self, name, new)


class MemoryView:
    """Several sources read as one. Block ids in results carry the source index in bits 48+."""

    def __init__(self, sources: Sequence[MemorySource], name: str = "view") -> None:
        if not sources:
            raise ValueError("a memory view needs at least one source")
        layouts = {(s.layout.layers, s.layout.n_kv_heads, s.layout.head_dim, s.layout.block_size) for s in sources}
        if len(layouts) != 1:
            raise ValueError(f"sources disagree on block layout: {layouts}")
        self.name = name
        self.sources = list(sources)
        self.layout = sources[0].layout

    def num_blocks(self) -> int:
        return sum(s.num_blocks() for s in self.sources)

    def search(self, layer: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        parts_s, parts_i = [], []
        for idx, src in enumerate(self.sources):
            if src.num_blocks() == 0:
                continue
            s, i = src.search(layer, queries, k)
            parts_s.append(s)
            parts_i.append(np.where(i >= 0, (np.int64(idx) << SOURCE_SHIFT) | i, -1))
        n = len(queries)
        if not parts_s:
            return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)
        scores = np.concatenate(parts_s, axis=1)
        ids = np.concatenate(parts_i, axis=1)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(scores, order, 1), np.take_along_axis(ids, order, 1)

    def fetch(self, layer: int, block_ids: np.ndarray) -> FetchedBlocks:
        ids = np.asarray(block_ids, dtype=np.int64)
        src_idx = ids >> SOURCE_SHIFT
        parts: list[tuple[np.ndarray, FetchedBlocks]] = []
        for idx in np.unique(src_idx):
            where = np.nonzero(src_idx == idx)[0]
            parts.append((where, self.sources[int(idx)].fetch(layer, ids[where] & LOCAL_MASK)))
        lay = self.layout
        keys = np.zeros((len(ids), lay.n_kv_heads, lay.block_size, lay.head_dim), dtype=np.float16)
        values = np.zeros_like(keys)
        lengths = np.zeros(len(ids), np.int64)
        spans = np.zeros((len(ids), 2), np.int64)
        for where, got in parts:
            keys[where], values[where], lengths[where], spans[where] = got.keys, got.values, got.lengths, got.spans
        return FetchedBlocks(keys, values, lengths, spans)


def split_view_id(view_id: int) -> tuple[int, int]:
    """view block id -> (source index, block id within that source)."""
    return int(view_id) >> SOURCE_SHIFT, int(view_id) & LOCAL_MASK

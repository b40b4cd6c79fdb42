"""A memory source restricted to a set of blocks (the candidates a hybrid search picked).

``FilteredSource(base, allowed)`` answers ``search`` with the best blocks among ``allowed`` only:
it asks the base for 8x the blocks wanted and, if too few allowed ones come back, searches all of
the base (exact flat search over representatives, so this stays correct, only slower). Block ids
are the base's ids, so traces and provenance map back unchanged.
"""

from __future__ import annotations

import numpy as np

from memllm.memory.types import FetchedBlocks


class FilteredSource:
    def __init__(self, base, allowed: np.ndarray, name: str | None = None) -> None:
        self.base = base
        self.allowed = np.unique(np.asarray(allowed, dtype=np.int64))
        self.name = name or f"{base.name}[{len(self.allowed)} blocks]"
        self.layout = base.layout

    def num_blocks(self) -> int:
        return len(self.allowed)

    def search(self, layer: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(queries)
        want = min(k, len(self.allowed))
        out_s = np.full((n, k), -np.inf, np.float32)
        out_i = np.full((n, k), -1, np.int64)
        if want == 0:
            return out_s, out_i
        total = self.base.num_blocks()
        ask = min(total, max(8 * k, 64))
        while True:
            scores, ids = self.base.search(layer, queries, ask)
            ok = np.isin(ids, self.allowed) & (ids >= 0)
            if ask >= total or ok.sum(axis=1).min() >= want:
                break
            ask = total
        for row in range(n):
            keep = np.nonzero(ok[row])[0][:k]
            out_s[row, : len(keep)] = scores[row, keep]
            out_i[row, : len(keep)] = ids[row, keep]
        return out_s, out_i

    def fetch(self, layer: int, block_ids: np.ndarray) -> FetchedBlocks:
        return self.base.fetch(layer, block_ids)

"""Per-owner FAISS indexes: one :class:`BlockIndex` per memory layer, ids = block ids.

Invariants:

* After :meth:`IndexManager.open` and after every committed write, each layer's index holds
  exactly the representatives of the owner's live (committed, not deleted) blocks, plus any
  staged blocks of the in-process source (ids >= ``PENDING_BASE``, never saved).
* Files (``layer-NNN.index``, see :mod:`memllm_storage.index_files`) are a cache: they may lag behind the
  database (saves are batched by ``checkpoint_fraction``) or be corrupt/missing after a crash.
  ``open`` checks each against the database's live id set and vector count: a valid file that
  disagrees is *repaired* by diff (remove extra ids, add missing blocks from payloads), a corrupt
  or missing one is *rebuilt* from the payloads. The database rows are the source of truth.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from memllm.memory.faiss_index import BlockIndex
from memllm.memory.types import BlockLayout
from memllm_storage.checksums import id_set_checksum
from memllm_storage.index_files import IndexFileError, index_ids, load_index, save_index

log = logging.getLogger(__name__)

# reps_of(block_ids, slot) -> (vector ids (m,), vectors (m, dim)): representatives from payloads
RepsOf = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


class IndexManager:
    def __init__(
        self,
        directory: Path,
        layout: BlockLayout,
        ivf_threshold: int = 200_000,
        checkpoint_fraction: float = 0.05,
    ) -> None:
        self.directory = Path(directory)
        self.layout = layout
        self.ivf_threshold = ivf_threshold
        self.checkpoint_fraction = checkpoint_fraction
        self.indexes = [BlockIndex(layout.search_dim, ivf_threshold) for _ in layout.layers]
        self._unsaved = [0 for _ in layout.layers]
        self.last_open_report: dict[int, str] = {}

    def file_name(self, slot: int) -> str:
        return f"layer-{self.layout.layers[slot]:03d}.index"

    def path(self, slot: int) -> Path:
        return self.directory / self.file_name(slot)

    # ---- opening -------------------------------------------------------------------------------
    def open(self, live_ids: np.ndarray, vector_count: int, reps_of: RepsOf) -> dict[int, str]:
        """Load every layer's file and make it agree with the database (see module docstring).

        live_ids: (n,) int64 ids of the owner's committed blocks; vector_count: their total
        representatives. Returns {model layer: "ok" | "repaired" | "rebuilt: <reason>"}.
        """
        live_ids = np.asarray(live_ids, dtype=np.int64)
        expected = (int(vector_count), id_set_checksum(live_ids, distinct=True))
        report: dict[int, str] = {}
        for slot, layer in enumerate(self.layout.layers):
            try:
                index, count, checksum = load_index(self.path(slot), self.ivf_threshold, expect_layer=layer)
            except IndexFileError as exc:
                reason = "missing" if not self.path(slot).exists() else str(exc)
                if live_ids.size == 0 and reason == "missing":
                    self.indexes[slot] = BlockIndex(self.layout.search_dim, self.ivf_threshold)
                    report[layer] = "ok"
                    continue
                self._rebuild(slot, live_ids, reps_of)
                report[layer] = f"rebuilt: {reason}"
                continue
            self.indexes[slot] = index
            if (count, checksum) == expected:
                report[layer] = "ok"
                continue
            self._repair(slot, live_ids, reps_of)
            if self.summary(slot) == expected:
                report[layer] = "repaired"
            else:
                self._rebuild(slot, live_ids, reps_of)
                report[layer] = "rebuilt: repair did not converge"
        for layer, what in report.items():
            if what != "ok":
                log.warning("index %s/layer %d %s", self.directory.name, layer, what)
        self.last_open_report = report
        return report

    def _rebuild(self, slot: int, live_ids: np.ndarray, reps_of: RepsOf) -> None:
        index = BlockIndex(self.layout.search_dim, self.ivf_threshold)
        if live_ids.size:
            ids, vecs = reps_of(live_ids, slot)
            index.add(ids, vecs)
        self.indexes[slot] = index
        self._unsaved[slot] = max(1, index.ntotal)
        self.save(slot)

    def _repair(self, slot: int, live_ids: np.ndarray, reps_of: RepsOf) -> None:
        index = self.indexes[slot]
        have = np.unique(index_ids(index))
        extra = np.setdiff1d(have, live_ids, assume_unique=True)
        missing = np.setdiff1d(live_ids, have, assume_unique=True)
        if extra.size:
            index.remove(extra)
        if missing.size:
            ids, vecs = reps_of(missing, slot)
            index.add(ids, vecs)
        self._unsaved[slot] += int(extra.size + missing.size) or 1
        self.save(slot)

    # ---- updates -------------------------------------------------------------------------------
    def add(self, slot: int, ids: np.ndarray, vectors: np.ndarray, *, persistent: bool = True) -> None:
        self.indexes[slot].add(ids, vectors)
        if persistent:
            self._unsaved[slot] += len(ids)

    def remove(self, block_ids: np.ndarray, *, persistent: bool = True) -> None:
        ids = np.asarray(block_ids, dtype=np.int64)
        if ids.size == 0:
            return
        for slot, index in enumerate(self.indexes):
            removed = index.remove(ids)
            if persistent:
                self._unsaved[slot] += removed

    def summary(self, slot: int) -> tuple[int, int]:
        index = self.indexes[slot]
        return index.ntotal, id_set_checksum(index_ids(index))

    # ---- saving --------------------------------------------------------------------------------
    def save(self, slot: int) -> None:
        """Atomically write one layer's index (caller holds the owner's write lock)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        save_index(self.path(slot), self.indexes[slot], self.layout.layers[slot])
        self._unsaved[slot] = 0

    def checkpoint(self, force: bool = False) -> int:
        """Save layers whose unsaved changes reach ``checkpoint_fraction`` of their size (all
        changed layers with ``force``); returns how many files were written."""
        saved = 0
        for slot, index in enumerate(self.indexes):
            pending = self._unsaved[slot]
            if pending and (force or pending >= self.checkpoint_fraction * max(1, index.ntotal)):
                self.save(slot)
                saved += 1
        return saved

    @property
    def dirty(self) -> bool:
        return any(self._unsaved)

"""A knowledge base's chunk embeddings on disk: append-only parts, merged like a binary counter.

The cache is derived data (rows are the truth; a missing embedding is recomputed from its chunk's
text), so it favours cheap writes: ingesting a document writes one small part file with that
document's vectors instead of rewriting every vector of the knowledge base (which made ingestion
quadratic in the knowledge base's size). After each append, the newest part is merged with the one
before it while that one is no larger, so there are O(log n) parts and each vector is rewritten
O(log n) times in all.

Layout: ``<folder>/<time_ns>-<pid>-<count>.npz`` with ``ids`` (int64, chunk ids) and ``vecs``
(float32, ``(count, dim)``), each written to a temporary name and renamed into place. Several
processes may write one folder: a part another process merged away meanwhile is skipped, and
duplicates of a chunk id (a merge raced with a load) are dropped on load; chunk ids are never
reused, so duplicates hold the same vector.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

SUFFIX = ".npz"


class EmbeddingCache:
    """The parts under ``folder`` (created on first write); vectors of dimension ``dim``."""

    def __init__(self, folder: Path, dim: int, legacy_file: Path | None = None) -> None:
        self.folder = Path(folder)
        self.dim = dim
        self.legacy_file = legacy_file  # a whole-cache file of older versions, read as the oldest part

    def exists(self) -> bool:
        return bool(self._parts()) or (self.legacy_file is not None and self.legacy_file.is_file())

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,), vecs (n, dim)) of every readable part, each id once."""
        loaded = [self._read(p) for p in self._sources()]
        pairs = [x for x in loaded if x is not None]
        if not pairs:
            return np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32)
        ids = np.concatenate([i for i, _ in pairs])
        vecs = np.concatenate([v for _, v in pairs])
        _, first = np.unique(ids, return_index=True)
        if len(first) != len(ids):
            keep = np.sort(first)
            ids, vecs = ids[keep], vecs[keep]
        return ids, vecs

    def append(self, ids: np.ndarray | list[int], vecs: np.ndarray) -> None:
        """Add vectors for new chunk ids (one part), then merge small parts."""
        ids = np.asarray(ids, np.int64)
        if not len(ids):
            return
        self._write(ids, np.asarray(vecs, np.float32))
        self._merge_tail()

    def replace(self, ids: np.ndarray, vecs: np.ndarray) -> None:
        """Make the cache exactly these vectors (one part; the others and any legacy file go)."""
        old = self._parts()
        if len(ids):
            self._write(np.asarray(ids, np.int64), np.asarray(vecs, np.float32))
        for p in old:
            p.unlink(missing_ok=True)
        if self.legacy_file is not None:
            self.legacy_file.unlink(missing_ok=True)

    def delete(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        if self.legacy_file is not None:
            self.legacy_file.unlink(missing_ok=True)

    # ---------------------------------------------------------------------------- plumbing
    def _parts(self) -> list[Path]:
        """Part files, oldest first (names start with a zero-padded creation time)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if p.suffix == SUFFIX and _count(p) is not None)

    def _sources(self) -> list[Path]:
        legacy = [self.legacy_file] if self.legacy_file is not None and self.legacy_file.is_file() else []
        return legacy + self._parts()

    def _read(self, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
        try:
            with np.load(path) as z:
                ids, vecs = z["ids"].astype(np.int64), z["vecs"].astype(np.float32)
        except FileNotFoundError:  # merged away by another process meanwhile
            return None
        except (OSError, ValueError, KeyError, EOFError) as exc:
            log.warning("unreadable embedding cache part %s (%s); its chunks will be re-embedded", path, exc)
            return None
        if len(ids) != len(vecs) or (len(ids) and (vecs.ndim != 2 or vecs.shape[1] != self.dim)):
            log.warning("embedding cache part %s holds vectors of another shape; ignored", path)
            return None
        return ids, vecs.reshape(len(ids), self.dim)

    def _write(self, ids: np.ndarray, vecs: np.ndarray) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"{time.time_ns():020d}-{os.getpid()}-{len(ids)}"
        tmp = self.folder / f"{name}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, ids=ids, vecs=vecs)
        path = self.folder / f"{name}{SUFFIX}"
        os.replace(tmp, path)
        return path

    def _merge_tail(self) -> None:
        parts = self._parts()
        while len(parts) >= 2 and _count(parts[-2]) <= _count(parts[-1]):
            a, b = parts[-2], parts[-1]
            read = [x for x in (self._read(a), self._read(b)) if x is not None]
            if read:
                self._write(np.concatenate([i for i, _ in read]), np.concatenate([v for _, v in read]))
            a.unlink(missing_ok=True)
            b.unlink(missing_ok=True)
            parts = self._parts()


def _count(path: Path) -> int | None:
    """The vector count a part's name records (None: not a part file)."""
    try:
        return int(path.stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return None

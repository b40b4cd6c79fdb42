"""The search side of a knowledge base: its live chunks, their embeddings and BM25 postings.

Rows are the truth: a :class:`ChunkIndex` holds the chunks of the KB's ``ready`` documents as of
its last :meth:`ChunkIndexCache.get`, which compares a cheap fingerprint (chunk count, largest
chunk id: ids are never reused) with the database before every search, so a deleted or replaced
document's chunks can never be returned. Embeddings are derived data, cached in
``<data_dir>/knowledge/kb-<id>/embeddings.npz`` keyed by chunk id (written atomically; a missing
or stale cache is recomputed from the chunk texts).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from memllm.knowledge.embeddings import Embedder
from memllm.knowledge.ranking import HybridIndex
from storage.models import Chunk, Document

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChunkRef:
    chunk_id: int
    document_id: int
    source_name: str
    ordinal: int
    char_start: int
    char_end: int
    token_start: int
    token_end: int
    text: str


def _live_chunks(kb_id: int):
    return (
        select(Chunk, Document.source_name)
        .join(Document, Document.id == Chunk.document_id)
        .where(Document.knowledge_base_id == kb_id, Document.status == "ready")
    )


async def chunk_fingerprint(session: AsyncSession, kb_id: int) -> tuple[int, int]:
    q = (
        select(func.count(Chunk.id), func.coalesce(func.max(Chunk.id), 0))
        .join(Document, Document.id == Chunk.document_id)
        .where(Document.knowledge_base_id == kb_id, Document.status == "ready")
    )
    c, m = (await session.execute(q)).one()
    return int(c), int(m)


class ChunkIndex:
    def __init__(self, kb_id: int, refs: list[ChunkRef], embeddings: np.ndarray, fingerprint: tuple[int, int]) -> None:
        self.kb_id = kb_id
        self.refs = refs
        self.fingerprint = fingerprint
        self.hybrid = HybridIndex([r.text for r in refs], embeddings)
        self.by_id = {r.chunk_id: i for i, r in enumerate(refs)}
        self.doc_ids = np.array([r.document_id for r in refs], np.int64)

    def __len__(self) -> int:
        return len(self.refs)

    def chunks_of(self, document_id: int) -> list[ChunkRef]:
        return sorted((r for r in self.refs if r.document_id == document_id), key=lambda r: r.ordinal)


class ChunkIndexCache:
    """One :class:`ChunkIndex` per knowledge base, rebuilt when its rows change."""

    def __init__(self, data_dir: Path, embedder: Embedder) -> None:
        self.data_dir = Path(data_dir)
        self.embedder = embedder
        self._indexes: dict[int, ChunkIndex] = {}
        self._lock = asyncio.Lock()

    def cache_path(self, kb_id: int) -> Path:
        return self.data_dir / "knowledge" / f"kb-{kb_id}" / "embeddings.npz"

    def forget(self, kb_id: int) -> None:
        self._indexes.pop(kb_id, None)

    async def get(self, session: AsyncSession, kb_id: int) -> ChunkIndex:
        fp = await chunk_fingerprint(session, kb_id)
        current = self._indexes.get(kb_id)
        if current is not None and current.fingerprint == fp:
            return current
        async with self._lock:
            rows = (await session.execute(_live_chunks(kb_id).order_by(Chunk.id))).all()
            refs = [
                ChunkRef(
                    c.id, c.document_id, name, c.ordinal, c.char_start, c.char_end, c.token_start, c.token_end, c.text
                )
                for c, name in rows
            ]
            vecs = await asyncio.to_thread(self._embeddings, kb_id, refs)
            index = ChunkIndex(kb_id, refs, vecs, (len(refs), max((r.chunk_id for r in refs), default=0)))
            self._indexes[kb_id] = index
            return index

    def store_embeddings(self, kb_id: int, chunk_ids: list[int], vecs: np.ndarray) -> None:
        """Add freshly computed embeddings to the cache file (after their rows committed)."""
        ids, old = self._load(kb_id)
        keep = ~np.isin(ids, chunk_ids)
        self._save(
            kb_id, np.concatenate([ids[keep], np.asarray(chunk_ids, np.int64)]), np.concatenate([old[keep], vecs])
        )

    def _load(self, kb_id: int) -> tuple[np.ndarray, np.ndarray]:
        path = self.cache_path(kb_id)
        if path.is_file():
            try:
                with np.load(path) as z:
                    ids, vecs = z["ids"].astype(np.int64), z["vecs"].astype(np.float32)
                if len(ids) == len(vecs) and ((vecs.ndim == 2 and vecs.shape[1] == self.embedder.dim) or not len(ids)):
                    return ids, vecs.reshape(len(ids), self.embedder.dim)
            except (OSError, ValueError, KeyError) as exc:
                log.warning("kb-%d: unreadable embedding cache %s (%s); recomputing", kb_id, path, exc)
        return np.zeros(0, np.int64), np.zeros((0, self.embedder.dim), np.float32)

    def _save(self, kb_id: int, ids: np.ndarray, vecs: np.ndarray) -> None:
        path = self.cache_path(kb_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"embeddings.tmp-{os.getpid()}.npz")
        np.savez(tmp, ids=ids, vecs=vecs)
        os.replace(tmp, path)

    def _embeddings(self, kb_id: int, refs: list[ChunkRef]) -> np.ndarray:
        """Embeddings of ``refs`` (cached ones reused, missing ones computed); prunes the cache."""
        ids, vecs = self._load(kb_id)
        pos = {int(i): j for j, i in enumerate(ids.tolist())}
        missing = [r for r in refs if r.chunk_id not in pos]
        if missing:
            log.info("kb-%d: embedding %d chunks missing from the cache", kb_id, len(missing))
            new = self.embedder.encode([r.text for r in missing])
            for j, r in enumerate(missing):
                pos[r.chunk_id] = len(vecs) + j
            vecs = np.concatenate([vecs, new]) if len(vecs) else new
        if not refs:
            if len(ids):
                self._save(kb_id, np.zeros(0, np.int64), np.zeros((0, self.embedder.dim), np.float32))
            return np.zeros((0, self.embedder.dim), np.float32)
        out = vecs[[pos[r.chunk_id] for r in refs]]
        if missing or len(ids) != len(refs):
            self._save(kb_id, np.array([r.chunk_id for r in refs], np.int64), out)
        return out

"""The search side of a knowledge base: its live chunks, their embeddings and BM25 postings.

Rows are the truth: a :class:`ChunkIndex` holds the chunks of the KB's ``ready`` documents as of
its last :meth:`ChunkIndexCache.get`, which compares a cheap fingerprint (chunk count, largest
chunk id: ids are never reused) with the database before every search, so a deleted or replaced
document's chunks can never be returned. Embeddings are derived data, cached by chunk id under
``<data_dir>/knowledge/kb-<id>/embeddings/`` (:mod:`memllm.knowledge.embedding_cache`: one small
part per ingested document, merged during later appends; a missing or stale entry
is recomputed from the chunk's text).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from memllm.knowledge.embedding_cache import EmbeddingCache
from memllm.knowledge.embeddings import Embedder
from memllm.knowledge.ranking import HybridIndex
from memllm_storage.models import Chunk, Document

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

    def embedding_cache(self, kb_id: int) -> EmbeddingCache:
        folder = self.data_dir / "knowledge" / f"kb-{kb_id}"
        # embeddings.npz: the single-file cache of earlier versions, still read until replaced
        return EmbeddingCache(folder / "embeddings", self.embedder.dim, legacy_file=folder / "embeddings.npz")

    def delete_cache(self, kb_id: int) -> None:
        """Forget a knowledge base's index and its embedding cache (files and folder)."""
        self.forget(kb_id)
        self.embedding_cache(kb_id).delete()
        with contextlib.suppress(OSError):
            (self.data_dir / "knowledge" / f"kb-{kb_id}").rmdir()

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
        """Add freshly computed embeddings to the cache (after their rows committed); blocking file
        work, so call it off the event loop."""
        self.embedding_cache(kb_id).append(chunk_ids, vecs)

    def _embeddings(self, kb_id: int, refs: list[ChunkRef]) -> np.ndarray:
        """Embeddings of ``refs`` (cached ones reused, missing ones computed); prunes the cache."""
        cache = self.embedding_cache(kb_id)
        ids, vecs = cache.load()
        pos = {int(i): j for j, i in enumerate(ids.tolist())}
        missing = [r for r in refs if r.chunk_id not in pos]
        if missing:
            log.info("kb-%d: embedding %d chunks missing from the cache", kb_id, len(missing))
            new = self.embedder.encode([r.text for r in missing])
            for j, r in enumerate(missing):
                pos[r.chunk_id] = len(vecs) + j
            vecs = np.concatenate([vecs, new]) if len(vecs) else new
        out = vecs[[pos[r.chunk_id] for r in refs]] if refs else np.zeros((0, self.embedder.dim), np.float32)
        if missing or len(ids) != len(refs):
            cache.replace(np.array([r.chunk_id for r in refs], np.int64), out)
        return out

"""Hybrid ranking of texts: sentence embeddings + BM25, fused.

``HybridIndex(texts, embeddings)`` answers ``rank(query, k, method)`` with method ``embeddings``,
``bm25`` or ``hybrid``. Hybrid fusion (default ``minmax``): each ranker's top ``depth`` scores are
min-max normalised to [0, 1] (0 outside its top list) and combined as
``alpha * dense + (1 - alpha) * bm25``. ``rrf`` (reciprocal rank fusion, ``1 / (60 + rank)``) is
kept for comparison. Defaults were tuned on the SciFact training claims (memllm/evals/retrieval.py:
``memllm eval retrieval --sweep`` prints the sweep).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from memllm.knowledge.lexical import BM25Index

METHODS = ("embeddings", "bm25", "hybrid")
DEFAULT_ALPHA = 0.5
DEFAULT_FUSION = "minmax"
DEFAULT_DEPTH = 100
RRF_K = 60


@dataclass
class Ranked:
    index: int  # position in the indexed texts
    score: float  # fused (or single-ranker) score
    dense: float | None = None  # cosine similarity, when computed
    bm25: float | None = None


def top_indices(scores: np.ndarray, k: int) -> np.ndarray:
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, np.int64)
    part = np.argpartition(-scores, k - 1)[:k]
    return part[np.argsort(-scores[part], kind="stable")].astype(np.int64)


def _minmax(scores: np.ndarray, idx: np.ndarray) -> dict[int, float]:
    if idx.size == 0:
        return {}
    s = scores[idx]
    lo, hi = float(s.min()), float(s.max())
    span = hi - lo
    return {int(i): (float(v) - lo) / span if span > 0 else 1.0 for i, v in zip(idx, s, strict=True)}


def fuse(
    dense: np.ndarray,
    bm25: np.ndarray,
    k: int,
    *,
    method: str = DEFAULT_FUSION,
    alpha: float = DEFAULT_ALPHA,
    depth: int = DEFAULT_DEPTH,
) -> list[Ranked]:
    """Fuse two full score vectors (N,) into the top k."""
    depth = max(depth, k)
    d_idx = top_indices(dense, depth)
    b_idx = top_indices(bm25, depth)
    b_idx = b_idx[bm25[b_idx] > 0]
    if method == "rrf":
        fused: dict[int, float] = {}
        for weight, idx in ((alpha, d_idx), (1 - alpha, b_idx)):
            for rank, i in enumerate(idx.tolist()):
                fused[i] = fused.get(i, 0.0) + 2 * weight / (RRF_K + rank + 1)
    elif method == "minmax":
        dn, bn = _minmax(dense, d_idx), _minmax(bm25, b_idx)
        fused = {i: alpha * dn.get(i, 0.0) + (1 - alpha) * bn.get(i, 0.0) for i in set(dn) | set(bn)}
    else:
        raise ValueError(f"unknown fusion {method!r} (minmax, rrf)")
    best = sorted(fused.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [Ranked(i, s, float(dense[i]), float(bm25[i])) for i, s in best]


class HybridIndex:
    """Embeddings matrix + BM25 postings over one list of texts (rebuilt when the texts change)."""

    def __init__(self, texts: Sequence[str], embeddings: np.ndarray) -> None:
        if len(texts) != len(embeddings):
            raise ValueError(f"{len(texts)} texts but {len(embeddings)} embeddings")
        self.texts = list(texts)
        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.embeddings = (
            emb.reshape(len(texts), -1) if len(texts) else emb.reshape(0, emb.shape[-1] if emb.ndim == 2 else 0)
        )
        self.bm25 = BM25Index(self.texts)

    def __len__(self) -> int:
        return len(self.texts)

    def dense_scores(self, query_vec: np.ndarray) -> np.ndarray:
        if len(self) == 0:
            return np.zeros(0, np.float32)
        return self.embeddings @ np.asarray(query_vec, np.float32).reshape(-1)

    def rank(
        self,
        query: str,
        query_vec: np.ndarray | None,
        k: int,
        method: str = "hybrid",
        *,
        fusion: str = DEFAULT_FUSION,
        alpha: float = DEFAULT_ALPHA,
        depth: int = DEFAULT_DEPTH,
        allowed: np.ndarray | None = None,
    ) -> list[Ranked]:
        """Top k texts for ``query`` (``query_vec``: its embedding, needed unless method is bm25).

        ``allowed``: optional boolean mask (N,) of texts that may be returned.
        """
        if method not in METHODS:
            raise ValueError(f"unknown ranking method {method!r}; choose one of {METHODS}")
        if len(self) == 0 or k <= 0:
            return []
        neg = np.float32(-np.inf)
        dense = self.dense_scores(query_vec) if method != "bm25" else None
        bm = self.bm25.scores(query) if method != "embeddings" else None
        if allowed is not None:
            if dense is not None:
                dense = np.where(allowed, dense, neg)
            if bm is not None:
                bm = np.where(allowed, bm, 0.0).astype(np.float32)
        if method == "embeddings":
            idx = top_indices(dense, k)
            idx = idx[np.isfinite(dense[idx])]
            return [Ranked(int(i), float(dense[i]), dense=float(dense[i])) for i in idx]
        if method == "bm25":
            idx = top_indices(bm, k)
            idx = idx[bm[idx] > 0]
            return [Ranked(int(i), float(bm[i]), bm25=float(bm[i])) for i in idx]
        dense = np.where(np.isfinite(dense), dense, np.float32(-1e9)) if allowed is not None else dense
        out = fuse(dense, bm, k, method=fusion, alpha=alpha, depth=depth)
        if allowed is not None:
            out = [r for r in out if allowed[r.index]]
        return out

"""Baselines for chatting over long histories, to measure session memory against.

* **truncation**: keep only the last N tokens of the history (what fits), read with full attention;
* **text retrieval**: index every past turn (sentence embeddings + BM25, fused) and paste the turns
  that best match the question into the prompt, under a token budget, in chronological order;
* **hybrid**: session memory (kNN over the model's own keys/values) *plus* the pasted turns.

Ranking reuses :class:`memllm.knowledge.ranking.HybridIndex` and the bundled sentence embedder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from memllm.knowledge.ranking import HybridIndex


@dataclass(frozen=True)
class PastTurn:
    """One earlier turn of a conversation: its text and when it was said."""

    order: int  # position in the conversation (chronological)
    text: str  # e.g. 'Caroline said, "I went to a support group yesterday."'
    date: str | None = None  # date header of its session
    group: str | None = None  # session label (turns of one group are printed under one header)


class TurnRetriever:
    """Embeddings + BM25 over past turns (see module docstring)."""

    def __init__(self, turns: Sequence[PastTurn], embedder=None, method: str = "hybrid") -> None:
        self.turns = list(turns)
        self.method = method
        self.embedder = embedder
        if embedder is None and method != "bm25":
            from memllm.knowledge.embeddings import Embedder

            self.embedder = Embedder()
        texts = [t.text for t in self.turns]
        vecs = self.embedder.encode(texts) if method != "bm25" else np.zeros((len(texts), 1), np.float32)
        self.index = HybridIndex(texts, vecs)

    def search(self, query: str, k: int) -> list[PastTurn]:
        qvec = self.embedder.encode_query(query) if self.method != "bm25" else None
        return [self.turns[r.index] for r in self.index.rank(query, qvec, k, self.method)]

    def context(self, query: str, count_tokens: Callable[[str], int], budget: int, k: int = 20) -> str:
        """The best turns for ``query`` that fit ``budget`` tokens, printed chronologically."""
        chosen: list[PastTurn] = []
        used = 0
        for t in self.search(query, k):
            n = count_tokens(t.text) + 2
            if used + n > budget:
                continue
            chosen.append(t)
            used += n
        return format_turns(sorted(chosen, key=lambda t: t.order))


def format_turns(turns: Sequence[PastTurn]) -> str:
    """Turns under their session's date header (``DATE: ...``), one per line."""
    lines: list[str] = []
    group = object()
    for t in turns:
        if t.group != group:
            group = t.group
            if t.date:
                lines.append(f"DATE: {t.date}")
        lines.append(t.text)
    return "\n".join(lines)


def last_tokens(text: str, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str], n: int) -> str:
    """The end of ``text`` that is at most ``n`` tokens long (cut at a token boundary)."""
    ids = encode(text)
    if len(ids) <= n:
        return text
    return decode(ids[-n:])

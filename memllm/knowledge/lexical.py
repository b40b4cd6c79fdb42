"""Okapi BM25 over texts, scored by the ``bm25s`` library on terms from :mod:`memllm.knowledge.analysis`.

Scoring (bm25s ``method="lucene"``, the Lucene variant of Kamphuis et al., ECIR 2020; k1=0.9,
b=0.4 as in Anserini)::

    score(q, d) = sum_t idf(t) * tf(t, d) / (tf(t, d) + k1 * (1 - b + b * |d| / avgdl))
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))

(Lucene >= 8 drops the constant ``k1 + 1`` factor; rankings and min-max fusion are unaffected.)
bm25s precomputes every posting's score into a sparse matrix, so a query only sums the postings of
its terms. Nothing is persisted: knowledge bases rebuild the index from their chunk rows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import bm25s
import numpy as np

from memllm.knowledge.analysis import analyze, stem_words, words

# bm25s sets its logger to DEBUG on import; let it follow the application's level (MEMLLM_LOG_LEVEL)
logging.getLogger("bm25s").setLevel(logging.NOTSET)

DEFAULT_K1 = 0.9
DEFAULT_B = 0.4


class BM25Index:
    """BM25 postings of a fixed list of texts; :meth:`scores` scores every text for a query."""

    def __init__(self, texts: Sequence[str], k1: float = DEFAULT_K1, b: float = DEFAULT_B) -> None:
        self.k1, self.b = k1, b
        self.n_docs = len(texts)
        self._bm25: bm25s.BM25 | None = None  # None: no text has a term, every score is 0
        doc_words = [words(t) for t in texts]
        distinct = sorted(set().union(*doc_words))
        if not distinct:
            return
        # each distinct word stemmed once (one call into the C stemmer); bm25s gets term ids
        vocab: dict[str, int] = {}
        term_of = {w: vocab.setdefault(s, len(vocab)) for w, s in zip(distinct, stem_words(distinct), strict=True)}
        corpus_ids = [[term_of[w] for w in ws] for ws in doc_words]
        self._bm25 = bm25s.BM25(k1=k1, b=b, method="lucene")
        self._bm25.index((corpus_ids, vocab), create_empty_token=False, show_progress=False)

    def __len__(self) -> int:
        return self.n_docs

    def scores(self, query: str) -> np.ndarray:
        """BM25 score of every text for ``query``, (N,) float32; a repeated query term counts once
        per occurrence (as in Lucene's boolean query), words not in the corpus score nothing."""
        ids = self._bm25.get_tokens_ids(analyze(query)) if self._bm25 is not None else []
        if not ids:
            return np.zeros(self.n_docs, np.float32)
        return np.asarray(self._bm25.get_scores_from_ids(ids), dtype=np.float32)

"""BM25 (bm25s), Porter stemming (PyStemmer), fusion and hybrid ranking (real sentence embedder)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from kb_helpers import shared_embedder

from memllm.knowledge.analysis import analyze, stem, stem_words
from memllm.knowledge.lexical import BM25Index
from memllm.knowledge.ranking import HybridIndex, fuse, top_indices


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("caresses", "caress"),
        ("ponies", "poni"),
        ("relational", "relat"),
        ("hopping", "hop"),
        ("generalization", "gener"),
        ("effective", "effect"),
        ("adjustment", "adjust"),
        ("sky", "sky"),
        ("is", "is"),  # words of one or two letters are not stemmed
        ("s", "s"),
    ],
)
def test_porter(word, expected):
    assert stem(word) == expected
    assert stem_words(["the", word]) == ["the", expected]


def test_analyze_lowercases_stems_and_drops_stopwords():
    assert analyze("The Running dogs and the cat's toys, e-mail!") == ["run", "dog", "cat", "toi", "e", "mail"]


def test_bm25_matches_hand_computed_score():
    docs = ["apple banana apple", "banana cherry", "cherry date elderberry fig"]
    idx = BM25Index(docs, k1=1.2, b=0.75)
    lengths = [3, 2, 4]
    avgdl = sum(lengths) / 3
    # "apple": df=1, tf=2 in doc 0; Lucene's BM25 (no constant k1 + 1 factor)
    idf = math.log(1 + (3 - 1 + 0.5) / (1 + 0.5))
    expected = idf * 2 / (2 + 1.2 * (1 - 0.75 + 0.75 * 3 / avgdl))
    s = idx.scores("apple")
    assert s.dtype == np.float32 and s.shape == (3,)
    assert s[0] == pytest.approx(expected, rel=1e-5)
    assert s[1] == 0 and s[2] == 0
    assert idx.scores("apple apple")[0] == pytest.approx(2 * expected, rel=1e-5)  # a repeated term counts twice
    both = idx.scores("cherry banana")
    top = top_indices(both, 3)
    assert set(top.tolist()) == {0, 1, 2} and top[0] == 1  # doc 1 has both terms
    assert idx.scores("zzz unknown").sum() == 0


def test_bm25_ranks_the_lexical_match_first():
    docs = [
        "The weather in the mountains was cold and windy all week.",
        "Mitochondrial DNA mutations cause several inherited metabolic disorders.",
        "A recipe for bread with flour, water, salt and yeast.",
        "Stock prices rose after the quarterly earnings report.",
    ]
    idx = BM25Index(docs)
    s = idx.scores("which mutations of mitochondrial dna are inherited?")
    assert int(np.argmax(s)) == 1 and s[1] > 0
    assert np.count_nonzero(s) == 1  # no other document shares a term
    # stemming matches other forms of a word: "mutated" ~ "mutations", "breads" ~ "bread"
    assert int(np.argmax(idx.scores("mutated"))) == 1
    assert int(np.argmax(idx.scores("Breads"))) == 2


def test_bm25_edge_cases_score_zero_without_error():
    empty = BM25Index([])
    assert len(empty) == 0 and empty.scores("anything").shape == (0,)
    no_terms = BM25Index(["", "the and of", "!!!"])  # nothing but stopwords and punctuation
    assert no_terms.scores("the query").tolist() == [0.0, 0.0, 0.0]
    idx = BM25Index(["apple pie", "", "banana split"])
    for query in ("", "   ", "the of and", "zyxwvut qqqq", "?!"):
        s = idx.scores(query)
        assert s.shape == (3,) and not s.any()
    assert idx.scores("apple")[1] == 0  # an empty document never matches
    index = HybridIndex(["apple pie", "banana split"], np.eye(2, dtype=np.float32))
    assert index.rank("zzz", None, 5, "bm25") == []
    assert [r.index for r in index.rank("zzz", np.array([0, 1], np.float32), 1, "hybrid")] == [1]


def test_minmax_and_rrf_fusion():
    dense = np.array([0.9, 0.8, 0.1, 0.0], np.float32)
    bm25 = np.array([0.0, 5.0, 10.0, 0.0], np.float32)
    mm = fuse(dense, bm25, 3, method="minmax", alpha=0.5, depth=10)
    # normalised: dense [1, .889, .111, 0]; bm25 over its positive top list [_, 0, 1, _]
    assert [r.index for r in mm] == [2, 0, 1]
    assert mm[0].score == pytest.approx(0.5 * 0.1 / 0.9 + 0.5)
    assert mm[1].score == pytest.approx(0.5)
    dense2 = np.array([0.9, 0.8, 0.0, 0.1], np.float32)
    rrf = fuse(dense2, bm25, 3, method="rrf", alpha=0.5, depth=10)
    assert rrf[0].index == 1  # second in both lists beats first in one
    with pytest.raises(ValueError):
        fuse(dense, bm25, 3, method="nope")


def test_hybrid_finds_both_exact_terms_and_paraphrases():
    texts = [
        "The reactor coolant pump model XR-7731 failed during the spring inspection.",
        "Cats are small domesticated carnivores that people keep as pets.",
        "A feline companion animal commonly lives in human homes.",
        "Stock markets fell sharply after the central bank raised interest rates.",
        "The recipe needs two cups of flour, sugar and three eggs.",
    ]
    emb = shared_embedder()
    index = HybridIndex(texts, emb.encode(texts))
    q1 = "XR-7731"
    assert index.rank(q1, emb.encode_query(q1), 1, "bm25")[0].index == 0
    assert index.rank(q1, emb.encode_query(q1), 1, "hybrid")[0].index == 0
    q2 = "pet kitty living with people"
    top_dense = [r.index for r in index.rank(q2, emb.encode_query(q2), 2, "embeddings")]
    assert set(top_dense) == {1, 2}
    hybrid = index.rank(q2, emb.encode_query(q2), 2, "hybrid")
    assert {r.index for r in hybrid} == {1, 2}
    assert all(r.dense is not None and r.bm25 is not None for r in hybrid)
    allowed = np.array([False, False, True, True, True])
    assert [r.index for r in index.rank(q2, emb.encode_query(q2), 1, "hybrid", allowed=allowed)] == [2]
    with pytest.raises(ValueError):
        index.rank(q2, None, 1, "other")

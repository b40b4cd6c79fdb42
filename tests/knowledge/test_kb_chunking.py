"""Chunker: exact character spans, paragraph and sentence boundaries, token limits, overlap."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from memllm.knowledge.chunking import TokenMap, chunk_for_span, chunk_text, sentence_spans
from memllm.knowledge.encoding import block_chunk_indices
from memllm.memory.types import MemoryBlock


def words(n: int, tag: str) -> str:
    return " ".join(f"{tag}{i}" for i in range(n))


def test_sentence_spans_respect_abbreviations():
    text = "Dr. Smith arrived at 5 p.m. on Monday. He left, e.g. by train! Did he return? Yes."
    got = [text[a:b] for a, b in sentence_spans(text)]
    assert got == ["Dr. Smith arrived at 5 p.m. on Monday.", "He left, e.g. by train!", "Did he return?", "Yes."]


def test_chunks_are_exact_spans_and_respect_limits():
    paras = [" ".join(f"Sentence {p}-{s} has {words(6, 'w')}." for s in range(5)) for p in range(6)]
    text = "\n\n".join(paras)
    tmap = TokenMap.approximate(text)
    chunks = chunk_text(text, tmap, max_tokens=60, overlap_tokens=12)
    assert len(chunks) > 3
    for c in chunks:
        assert text[c.char_start : c.char_end] == c.text
        assert c.token_end - c.token_start <= 60
        assert c.text[0].isupper() and c.text.endswith(".")  # starts and ends on sentence boundaries
    # every sentence lies inside some chunk, in order
    covered = set()
    for c in chunks:
        covered.update(range(c.char_start, c.char_end))
    for a, b in sentence_spans(text):
        assert set(range(a, b)) <= covered
    assert [c.ordinal for c in chunks] == list(range(len(chunks)))


def test_paragraph_break_preferred_and_no_overlap_across_paragraphs():
    p1 = " ".join(f"Alpha sentence {i} is here." for i in range(8))  # ~40 tokens
    p2 = " ".join(f"Beta sentence {i} is here." for i in range(8))
    text = p1 + "\n\n" + p2
    chunks = chunk_text(text, TokenMap.approximate(text), max_tokens=60, overlap_tokens=10)
    assert [c.text for c in chunks] == [p1, p2]


def test_overlap_inside_a_paragraph():
    text = " ".join(f"Sentence number {i} says something." for i in range(30))
    chunks = chunk_text(text, TokenMap.approximate(text), max_tokens=40, overlap_tokens=14)
    assert len(chunks) >= 3
    for a, b in itertools.pairwise(chunks):
        assert b.char_start < a.char_end  # overlapping
        assert b.char_start > a.char_start  # progress
        shared = text[b.char_start : a.char_end]
        assert shared.strip().endswith(".")  # whole sentences carried


def test_overlong_sentence_is_cut_at_word_boundaries():
    text = words(250, "tok")  # one sentence, no punctuation
    chunks = chunk_text(text, TokenMap.approximate(text), max_tokens=50, overlap_tokens=0)
    assert len(chunks) == 5
    assert " ".join(c.text for c in chunks) == text
    assert all(c.token_end - c.token_start <= 50 for c in chunks)


def test_real_tokenizer_token_spans(kb_engine):
    text = "Ein Beispiel. " * 3 + "\n\nAnother paragraph with words, numbers 12345 and punctuation!"
    ids, tmap = TokenMap.from_tokenizer(kb_engine.tokenizer, text)
    assert tmap.n_tokens == len(ids)
    chunks = chunk_text(text, tmap, max_tokens=16, overlap_tokens=0)
    assert chunks[0].token_start == 0 and chunks[-1].token_end == len(ids)
    for c in chunks:  # the token span re-tokenizes to the chunk text (up to whitespace / casing)
        decoded = kb_engine.tokenizer.decode(ids[c.token_start : c.token_end]).replace(" ", "").lower()
        assert decoded == c.text.replace(" ", "").lower()


def test_block_to_chunk_by_largest_overlap():
    spans = [(0, 10), (8, 30), (30, 45)]
    d = 1
    blocks = [
        MemoryBlock(
            np.zeros((1, 1, n, d), np.float16),
            np.zeros((1, 1, n, d), np.float16),
            np.zeros((1, 1, d), np.float32),
            s,
            s + n,
        )
        for s, n in [(0, 9), (9, 16), (25, 16), (41, 4)]
    ]
    assert block_chunk_indices(blocks, spans) == [0, 1, 2, 2]
    assert chunk_for_span([], 0, 5) is None


@pytest.mark.parametrize("bad", [0, 4])
def test_tiny_chunk_size_refused(bad):
    with pytest.raises(ValueError):
        chunk_text("Some text.", max_tokens=bad)

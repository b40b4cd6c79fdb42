"""Splitting a document's text into chunks on paragraph and sentence boundaries, token-aware.

Chunks are the units of search and citation: each one is an exact character span of the
document text (``text[char_start:char_end] == chunk.text``) and a token span in the document's
memory stream (the model's tokens of the whole text, read once). Sizes are counted in the model's
tokens through a :class:`TokenMap` built from the tokenizer's offsets, so no chunk is tokenized twice.

Rules: sentences are packed greedily up to ``max_tokens``; a chunk ends early at a paragraph break
once it is at least half full; consecutive chunks inside one paragraph overlap by whole trailing
sentences up to ``overlap_tokens``; a sentence longer than ``max_tokens`` is cut at word boundaries.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass

# A sentence ends at . ! ? (optionally followed by quotes/brackets) then whitespace and a capital,
# digit, quote or bracket; common abbreviations do not end sentences.
_SENT_END = re.compile(r"(?<=[.!?])[\"'\u201d\u2019)\]]*\s+(?=[A-Z0-9\"'\u201c\u2018(\[])")
_ABBREV = re.compile(
    r"(?:\b(?:e\.g|i\.e|etc|vs|cf|al|fig|eq|no|dr|mr|mrs|ms|prof|st|jr|sr|inc|ltd|approx)\.|\b[A-Z]\.)$",
    re.IGNORECASE,
)
_PARA = re.compile(r"\n\s*\n")


@dataclass(frozen=True)
class TextChunk:
    ordinal: int
    char_start: int
    char_end: int
    token_start: int
    token_end: int
    text: str

    def as_row(self) -> dict:
        return {
            "ordinal": self.ordinal,
            "char_start": self.char_start,
            "char_end": self.char_end,
            "token_start": self.token_start,
            "token_end": self.token_end,
            "text": self.text,
        }


class TokenMap:
    """Character <-> token positions of one text, from the tokenizer's offset mapping.

    ``offsets``: (start, end) character span of each token, in order.
    """

    def __init__(self, offsets: Sequence[tuple[int, int]], text_length: int) -> None:
        self.starts = [int(s) for s, _ in offsets]
        self.ends = [int(e) for _, e in offsets]
        self.n_tokens = len(self.starts)
        self.text_length = text_length

    @classmethod
    def from_tokenizer(cls, tokenizer, text: str) -> tuple[list[int], TokenMap]:
        """(token ids, map) of ``text`` with a fast tokenizer (no special tokens)."""
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), cls(enc["offset_mapping"], len(text))

    @classmethod
    def approximate(cls, text: str) -> TokenMap:
        """A stand-in without a tokenizer: one token per word or punctuation mark."""
        return cls([(m.start(), m.end()) for m in re.finditer(r"\w+|[^\w\s]", text)], len(text))

    def token_span(self, char_start: int, char_end: int) -> tuple[int, int]:
        """Tokens overlapping characters [char_start, char_end) as a half-open token range."""
        first = bisect.bisect_right(self.ends, char_start)  # first token ending after char_start
        last = bisect.bisect_left(self.starts, char_end)  # tokens starting before char_end
        return first, max(first, last)

    def count(self, char_start: int, char_end: int) -> int:
        a, b = self.token_span(char_start, char_end)
        return b - a

    def char_of_token(self, token: int) -> int:
        if token >= self.n_tokens:
            return self.text_length
        return self.starts[token]


def sentence_spans(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """Character spans of the sentences in text[start:end] (whitespace between them excluded)."""
    end = len(text) if end is None else end
    spans = []
    pos = start
    for m in _SENT_END.finditer(text, start, end):
        if _ABBREV.search(text, max(pos, m.start() - 8), m.start()):
            continue
        spans.append((pos, m.start()))
        pos = m.end()
    if pos < end:
        spans.append((pos, end))
    return [(a, b) for a, b in ((_lstrip(text, a, b), _rstrip(text, a, b)) for a, b in spans) if b > a]


def _lstrip(text: str, a: int, b: int) -> int:
    while a < b and text[a].isspace():
        a += 1
    return a


def _rstrip(text: str, a: int, b: int) -> int:
    while b > a and text[b - 1].isspace():
        b -= 1
    return b


def paragraph_spans(text: str) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for m in _PARA.finditer(text):
        spans.append((pos, m.start()))
        pos = m.end()
    spans.append((pos, len(text)))
    return [(_lstrip(text, a, b), _rstrip(text, a, b)) for a, b in spans if text[a:b].strip()]


def _split_long(text: str, a: int, b: int, tmap: TokenMap, max_tokens: int) -> list[tuple[int, int]]:
    """Cut one over-long sentence into pieces of at most max_tokens, at word boundaries if possible."""
    pieces = []
    while a < b:
        t0, t1 = tmap.token_span(a, b)
        if t1 - t0 <= max_tokens:
            pieces.append((a, b))
            break
        cut = tmap.char_of_token(t0 + max_tokens)  # first character past the budget
        space = text.rfind(" ", a + 1, cut)
        if space > a + (cut - a) // 2:
            cut = space
        cut = max(cut, a + 1)
        pieces.append((a, _rstrip(text, a, cut)))
        a = _lstrip(text, cut, b)
    return [(x, y) for x, y in pieces if y > x]


def chunk_text(
    text: str, tmap: TokenMap | None = None, max_tokens: int = 200, overlap_tokens: int = 32
) -> list[TextChunk]:
    """Chunks of ``text`` (see module docstring). ``tmap`` defaults to an approximate word map."""
    if max_tokens < 8:
        raise ValueError("max_tokens must be at least 8")
    overlap_tokens = max(0, min(overlap_tokens, max_tokens // 2))
    tmap = tmap or TokenMap.approximate(text)
    # units: (char_start, char_end, tokens, ends_paragraph)
    units: list[tuple[int, int, int, bool]] = []
    for pa, pb in paragraph_spans(text):
        sents = []
        for sa, sb in sentence_spans(text, pa, pb):
            sents.extend(_split_long(text, sa, sb, tmap, max_tokens))
        for i, (sa, sb) in enumerate(sents):
            units.append((sa, sb, tmap.count(sa, sb), i == len(sents) - 1))
    chunks: list[tuple[int, int]] = []  # (first unit, last unit) inclusive
    i = 0
    while i < len(units):
        j, total = i, units[i][2]
        while j + 1 < len(units):
            nxt = units[j + 1][2]
            if total + nxt > max_tokens:
                break
            if units[j][3] and total >= max_tokens // 2:
                # at a paragraph end and half full: stop unless the whole next paragraph fits
                k, para = j + 1, 0
                while k < len(units):
                    para += units[k][2]
                    if units[k][3]:
                        break
                    k += 1
                if total + para > max_tokens:
                    break
            j += 1
            total += nxt
        chunks.append((i, j))
        if j + 1 >= len(units):
            break
        # next chunk: overlap with trailing sentences of this one, unless we broke at a paragraph end
        nxt_i = j + 1
        if not units[j][3] and overlap_tokens:
            back, carried = j, 0  # carry units back+1..j (same paragraph as j+1, never unit i)
            while back > i and not units[back][3] and carried + units[back][2] <= overlap_tokens:
                carried += units[back][2]
                back -= 1
            if carried:
                nxt_i = back + 1
        i = nxt_i
    out = []
    for n, (a, b) in enumerate(chunks):
        ca, cb = units[a][0], units[b][1]
        ta, tb = tmap.token_span(ca, cb)
        out.append(TextChunk(n, ca, cb, ta, tb, text[ca:cb]))
    return out


def chunk_for_span(chunks: Sequence[TextChunk], token_start: int, token_end: int) -> int | None:
    """Index of the chunk whose token span overlaps [token_start, token_end) the most (ties: earlier)."""
    best, best_overlap = None, 0
    for i, c in enumerate(chunks):
        overlap = min(c.token_end, token_end) - max(c.token_start, token_start)
        if overlap > best_overlap:
            best, best_overlap = i, overlap
    return best

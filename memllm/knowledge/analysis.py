"""Text analysis for lexical matching: lowercase words, English stopwords removed, Porter stems.

Stems come from PyStemmer (the Snowball project's C implementation of M.F. Porter's 1980
algorithm, ``Stemmer.Stemmer("porter")``); the same :func:`stem` normalises answers for token F1
(memllm/evals). Stemmer objects are not thread-safe, so each thread gets its own.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence

import Stemmer

STEMMER_ALGORITHM = "porter"
# Shorter words are not stemmed, as in Porter's reference C version and NLTK ("is" stays "is", not
# "i"; "s" would become an empty term).
SHORTEST_STEMMED = 3

# Lucene's English stopwords plus a few frequent function words.
STOPWORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no",
    "not", "of", "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this",
    "to", "was", "will", "with", "we", "our", "you", "your", "he", "she", "his", "her", "its", "from",
    "has", "have", "had", "were", "been", "being", "which", "who", "whom", "what", "when", "where",
    "why", "how", "than", "so", "do", "does", "did", "can", "could", "would", "should", "may", "might",
))  # fmt: skip
_WORD = re.compile(r"([a-z0-9]+)(?:'s\b)?")  # the group: a possessive 's is matched but left out
_local = threading.local()


def _stemmer() -> Stemmer.Stemmer:
    """This thread's stemmer (PyStemmer keeps a small cache of recent words per object)."""
    stemmer = getattr(_local, "stemmer", None)
    if stemmer is None:
        stemmer = _local.stemmer = Stemmer.Stemmer(STEMMER_ALGORITHM)
    return stemmer


def stem(word: str) -> str:
    """Porter stem of a lowercase word (words of one or two letters are kept as they are)."""
    return word if len(word) < SHORTEST_STEMMED else _stemmer().stemWord(word)


def stem_words(words: Sequence[str]) -> list[str]:
    """:func:`stem` of each word, in order (one call into the C stemmer)."""
    if not words:
        return []
    stems = _stemmer().stemWords(words)
    return [w if len(w) < SHORTEST_STEMMED else s for w, s in zip(words, stems, strict=True)]


def words(text: str) -> list[str]:
    """Lowercase alphanumeric words of ``text`` without stopwords, unstemmed: a possessive ``'s`` is
    dropped, hyphens and apostrophes split words ("e-mail" -> "e", "mail")."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


def analyze(text: str) -> list[str]:
    """Terms of ``text`` for BM25: :func:`words`, Porter-stemmed."""
    return stem_words(words(text))

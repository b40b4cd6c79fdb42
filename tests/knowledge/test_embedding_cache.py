"""The append-only embedding cache: what goes in comes out, parts stay few, writes stay small."""

from __future__ import annotations

import math

import numpy as np
import pytest

from memllm.knowledge.embedding_cache import EmbeddingCache

DIM = 8


def vectors(ids: list[int]) -> np.ndarray:
    """A vector that names its chunk id (so a mix-up shows)."""
    return np.array([[i + d / 10 for d in range(DIM)] for i in ids], np.float32)


def test_appends_load_back_every_vector_with_few_parts(tmp_path):
    cache = EmbeddingCache(tmp_path / "emb", DIM)
    assert not cache.exists()
    ids_all: list[int] = []
    largest_write = 0
    for doc in range(200):
        ids = list(range(doc * 3, doc * 3 + 3))
        before = {p.name for p in cache.folder.glob("*.npz")} if cache.folder.exists() else set()
        cache.append(ids, vectors(ids))
        ids_all += ids
        new = [p for p in cache.folder.glob("*.npz") if p.name not in before]
        largest_write = max(largest_write, *(int(p.stem.rsplit("-", 1)[1]) for p in new))
        ids_back, vecs_back = cache.load()
        assert sorted(ids_back.tolist()) == ids_all
    order = np.argsort(ids_back)
    np.testing.assert_array_equal(vecs_back[order], vectors(ids_all))
    parts = list(cache.folder.glob("*.npz"))
    assert len(parts) <= math.ceil(math.log2(200)) + 1  # a binary counter of parts
    assert largest_write == 3 * 128  # the merge at the 128th document: never the whole cache per write...
    assert not list(cache.folder.glob("*.tmp"))


def test_each_vector_is_rewritten_a_logarithmic_number_of_times(tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path / "emb", DIM)
    written = []
    real = cache._write
    monkeypatch.setattr(cache, "_write", lambda ids, vecs: written.append(len(ids)) or real(ids, vecs))
    n_docs = 256
    for doc in range(n_docs):
        cache.append([doc], vectors([doc]))
    # ...so the total written is O(n log n), where rewriting the whole cache per document is O(n^2)
    assert sum(written) <= n_docs * (math.log2(n_docs) + 1)
    assert sum(written) < n_docs * (n_docs + 1) / 2 / 10


def test_replace_prunes_and_absorbs_the_legacy_file(tmp_path):
    legacy = tmp_path / "embeddings.npz"
    np.savez(legacy, ids=np.array([1, 2], np.int64), vecs=vectors([1, 2]))
    cache = EmbeddingCache(tmp_path / "emb", DIM, legacy_file=legacy)
    assert cache.exists()
    cache.append([3], vectors([3]))
    ids, vecs = cache.load()
    assert ids.tolist() == [1, 2, 3]
    np.testing.assert_array_equal(vecs, vectors([1, 2, 3]))
    cache.replace(np.array([2, 3], np.int64), vectors([2, 3]))
    assert not legacy.exists() and len(list(cache.folder.glob("*.npz"))) == 1
    assert cache.load()[0].tolist() == [2, 3]
    cache.replace(np.zeros(0, np.int64), np.zeros((0, DIM), np.float32))
    assert not cache.exists() and cache.load()[1].shape == (0, DIM)
    cache.append([4], vectors([4]))
    cache.delete()
    assert not cache.folder.exists() and not cache.exists()


def test_broken_or_foreign_parts_are_skipped_duplicates_dropped(tmp_path, caplog):
    cache = EmbeddingCache(tmp_path / "emb", DIM)
    cache.append([1, 2], vectors([1, 2]))
    cache.folder.joinpath("00000000000000000001-1-5.npz").write_bytes(b"not a zip file")
    np.savez(cache.folder / "00000000000000000002-1-1.npz", ids=np.array([7]), vecs=np.zeros((1, DIM + 1)))
    np.savez(cache.folder / "00000000000000000003-1-1.npz", ids=np.array([2]), vecs=vectors([2]))
    cache.folder.joinpath("notes.txt").write_text("not a part")
    ids, vecs = cache.load()
    assert sorted(ids.tolist()) == [1, 2]  # 7 had the wrong dimension; one 2 is a duplicate
    np.testing.assert_array_equal(vecs[np.argsort(ids)], vectors([1, 2]))
    assert "unreadable embedding cache part" in caplog.text and "another shape" in caplog.text


@pytest.mark.parametrize("n", [0, 1])
def test_empty_appends_write_nothing(tmp_path, n):
    cache = EmbeddingCache(tmp_path / "emb", DIM)
    cache.append(list(range(n)), vectors(list(range(n))))
    assert cache.exists() == bool(n)

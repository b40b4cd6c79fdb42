"""Reading a document for ingestion: a window read by default (``ingest_top_k`` 0), or a read that
also retrieves from the document's own evicted past (``ingest_top_k`` -1)."""

from __future__ import annotations

import dataclasses

import numpy as np
from kb_helpers import TINY_MEMORY

from memllm.engine import Engine
from memllm.knowledge.encoding import encode_document
from memllm.memory.source import InMemorySource


def _read(engine: Engine, ingest_top_k: int, ids: list[int], monkeypatch) -> tuple[list, int]:
    """(blocks, memory searches made) of ``encode_document`` with the given ``ingest_top_k``."""
    searches = []
    real_search = InMemorySource.search

    def counting_search(self, layer, queries, k):
        searches.append(k)
        return real_search(self, layer, queries, k)

    monkeypatch.setattr(InMemorySource, "search", counting_search)
    reader = Engine(engine.loaded, dataclasses.replace(TINY_MEMORY, ingest_top_k=ingest_top_k))
    return encode_document(reader, ids), len(searches)


def test_ingestion_reads_through_the_window_unless_asked_to_retrieve(kb_engine, monkeypatch):
    ids = list(np.random.default_rng(0).integers(10, 1000, size=6 * TINY_MEMORY.window))
    window_blocks, window_searches = _read(kb_engine, 0, ids, monkeypatch)
    memory_blocks, memory_searches = _read(kb_engine, -1, ids, monkeypatch)

    assert window_searches == 0
    assert memory_searches > 0
    for blocks in (window_blocks, memory_blocks):  # every token but the first in exactly one block
        covered = sorted(t for b in blocks for t in range(b.token_start, b.token_end))
        assert covered == list(range(1, len(ids)))
    # the first evicted block was read before any memory existed: the same keys both ways;
    # the last one attended to retrieved blocks in the -1 read only, so its deeper keys differ
    np.testing.assert_array_equal(window_blocks[0].keys, memory_blocks[0].keys)
    assert not np.array_equal(window_blocks[-1].keys[-1], memory_blocks[-1].keys[-1])

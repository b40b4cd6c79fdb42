"""Helpers over attention states that chat sessions need: fork, re-position, discard evictions.

A session's live state holds sinks + the local window of its stream; everything older is in the
session's persisted memory. These helpers never change what the attention layer computes.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from memllm.attention import StreamingAttention
from memllm.engine import Engine
from memllm.memory.source import MemorySource, WritableMemorySource
from memllm.memory.types import BlockLayout, FetchedBlocks, MemoryBlock


class DiscardSink:
    """A memory sink that keeps nothing (used while re-reading tokens whose blocks are persisted)."""

    def __init__(self, layout: BlockLayout, name: str = "discard") -> None:
        self.name = name
        self.layout = layout
        self.discarded = 0

    def num_blocks(self) -> int:
        return 0

    def add(self, block: MemoryBlock) -> int:
        self.discarded += 1
        return -1

    def search(self, layer: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        n = len(queries)
        return np.full((n, k), -np.inf, np.float32), np.full((n, k), -1, np.int64)

    def fetch(self, layer: int, block_ids: np.ndarray) -> FetchedBlocks:
        raise KeyError("a discarding sink holds no blocks")


def first_local_position(state: StreamingAttention) -> int:
    """True stream position of the first non-sink token the state holds, or will hold: the start
    of the next block to leave the window. Before the sinks are full that is ``sinks``, not the
    number of tokens read (a session's first message longer than the window evicts blocks that
    start there)."""
    return state.local_start


def shift_positions(state: StreamingAttention, tokens: int) -> None:
    """Make a state that read sinks + a tail act as if ``tokens`` tokens between them had left it
    (they are in memory): stream positions and eviction counters advance, the buffer is unchanged."""
    state.n_tokens += tokens
    state.local_start += tokens
    state.evicted_blocks += tokens // state.mem.block_size


def fork_state(
    engine: Engine,
    state: StreamingAttention,
    *,
    sink: WritableMemorySource | None,
    extra_sources: list[MemorySource],
    trace: bool = False,
    **changes: object,
) -> StreamingAttention:
    """A copy of ``state``'s tokens (sinks + window) over new memory: the copy can read and generate
    without changing ``state``. ``sink`` receives the copy's evictions. ``changes``: memory settings
    that differ in the copy (only those that leave the buffer's layout alone, e.g. ``final_retrieval``)."""
    overrides = {f.name: getattr(state.mem, f.name) for f in dataclasses.fields(state.mem) if f.name != "mode"}
    overrides.update(changes)
    new = engine.new_state(state.mode, extra_sources=extra_sources, sink=sink, trace=trace, **overrides)
    new.buf = state.buf.copy()
    new.n_tokens = state.n_tokens
    new.local_start = state.local_start
    new.evicted_blocks = state.evicted_blocks
    return new

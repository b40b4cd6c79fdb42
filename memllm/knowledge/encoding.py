"""Reading a document through the model as one continuous stream, collecting its memory blocks.

The document is prefilled in memory mode with a sink that only collects: it attends to its own
evicted past (kNN over the blocks it has already produced) and nothing else, exactly as a long
prompt would. At the end, ``flush_to_memory`` moves the sinks and the local window into the sink
too, so every token of the document lies in exactly one block.

Token spans are assigned here from the order blocks arrive (evicted blocks are consecutive from the
first non-sink token; the flush adds the sink block, then the rest of the window), so they do not
depend on the spans the attention state writes into blocks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np
import torch

from memllm.attention import block_layout
from memllm.memory.source import InMemorySource
from memllm.memory.types import BlockLayout, MemoryBlock


class CollectingSink(InMemorySource):
    """An in-memory source that also keeps every block it receives, in order."""

    def __init__(self, layout: BlockLayout) -> None:
        super().__init__(layout, name="document")
        self.blocks: list[MemoryBlock] = []

    def add(self, block: MemoryBlock) -> int:
        self.blocks.append(block)
        return super().add(block)


def engine_layout(engine) -> BlockLayout:
    return block_layout(engine.model.config, engine.memory_settings)


def encode_document(
    engine, ids: Sequence[int], progress: Callable[[int], None] | None = None, should_stop: Callable[[], bool] | None = None
) -> list[MemoryBlock]:
    """Blocks of the document ``ids`` (token order, spans covering [0, len(ids)) exactly once).

    ``should_stop`` is polled between chunks; when it returns True the read is abandoned
    (raises :class:`InterruptedError`) and nothing is kept.
    """
    if not ids:
        raise ValueError("empty document")
    sink = CollectingSink(engine_layout(engine))
    state = engine.new_state(mode="memory", sink=sink)

    def step(n: int) -> None:
        if progress is not None:
            progress(n)
        if should_stop is not None and should_stop():
            raise InterruptedError("ingestion interrupted")

    engine.prefill(state, ids, step)
    evicted = len(sink.blocks)
    n_sinks = state.n_sinks
    with torch.inference_mode():  # the state's buffers are inference tensors
        state.flush_to_memory(include_sinks=True)
    blocks = sink.blocks
    pos = n_sinks
    fixed: list[MemoryBlock] = []
    for i, b in enumerate(blocks):
        n = b.length
        if i == evicted and n_sinks:  # the flush writes the sink tokens first
            fixed.append(dataclasses.replace(b, token_start=0, token_end=n))
            continue
        fixed.append(dataclasses.replace(b, token_start=pos, token_end=pos + n))
        pos += n
    fixed.sort(key=lambda b: b.token_start)
    covered = sum(b.length for b in fixed)
    if covered != len(ids) or (fixed and fixed[-1].token_end != len(ids)):
        raise RuntimeError(f"memory blocks cover {covered} tokens of a {len(ids)}-token document")
    return fixed


def block_chunk_indices(blocks: Sequence[MemoryBlock], chunk_spans: Sequence[tuple[int, int]]) -> list[int | None]:
    """For each block, the chunk (index into chunk_spans) whose token span overlaps it the most."""
    if not chunk_spans:
        return [None] * len(blocks)
    starts = np.array([s for s, _ in chunk_spans])
    ends = np.array([e for _, e in chunk_spans])
    out: list[int | None] = []
    for b in blocks:
        overlap = np.minimum(ends, b.token_end) - np.maximum(starts, b.token_start)
        best = int(np.argmax(overlap))
        out.append(best if overlap[best] > 0 else None)
    return out

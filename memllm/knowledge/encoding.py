"""Reading a document through the model as one continuous stream, collecting its memory blocks.

The document is prefilled in memory mode with a sink that only collects. With ``ingest_top_k`` 0
(the default) it attends to its sinks and local window only, a window read whose evicted blocks are
kept; with -1 it also attends to its own evicted past (kNN over the blocks it has already produced),
exactly as a long prompt would. It never sees another document. At the end, ``flush_to_memory``
moves the sinks and the local window into the sink too, so every token of the document lies in
exactly one block.

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
from memllm.settings import ingest_overrides


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
    engine,
    ids: Sequence[int],
    progress: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    drop_first: bool = True,
) -> list[MemoryBlock]:
    """Blocks of the document ``ids`` in token order, spans covering [0, len(ids)) exactly once,
    except the first token with ``drop_first`` (see :func:`_without_first_token`).

    ``should_stop`` is polled between chunks; when it returns True the read is abandoned
    (raises :class:`InterruptedError`) and nothing is kept.
    """
    if not ids:
        raise ValueError("empty document")
    sink = CollectingSink(engine_layout(engine))
    state = engine.new_state(mode="memory", sink=sink, **ingest_overrides(engine.memory_settings))

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
    if drop_first and fixed and fixed[0].length > 1:
        fixed[0] = _without_first_token(fixed[0])
    return fixed


def _without_first_token(block: MemoryBlock) -> MemoryBlock:
    """The block minus its first token (the document's position 0).

    The first token of a stream becomes an attention sink: its key draws a large share of every
    query's attention whatever the content. Stored in a knowledge base it would be retrieved and
    attended by every question (measured: ~70% of the memory attention of a passkey question went
    to the sink block of the document). A representative that was that token's key is replaced
    by another representative of the block.
    """
    keys, values, reps = block.keys[:, :, 1:], block.values[:, :, 1:], block.representatives.copy()
    first = block.keys[:, :, 0].astype(np.float32).reshape(keys.shape[0], -1)  # (L, Hkv*D)
    for layer in range(reps.shape[0]):
        diff = np.abs(reps[layer] - first[layer]).max(axis=1)  # (R,)
        is_first = diff <= 1e-2 * (np.abs(first[layer]).max() + 1e-6)
        if is_first.any() and not is_first.all():
            reps[layer, is_first] = reps[layer, ~is_first][0]
        elif is_first.all():  # a one-token block would be empty; keep a key of the next token
            reps[layer, :] = keys[layer, :, 0].astype(np.float32).reshape(-1)
    return MemoryBlock(
        np.ascontiguousarray(keys), np.ascontiguousarray(values), reps, block.token_start + 1, block.token_end
    )


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

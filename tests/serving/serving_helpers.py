"""Helpers for the serving tests: an engine over the tiny random model (no tokenizer needed)."""

from __future__ import annotations

import dataclasses

import torch

from memllm.engine import Engine
from memllm.loading import LoadedModel
from memllm.settings import MemorySettings

# small geometry: a hundred tokens already evict blocks to memory and search them
SMALL = MemorySettings(
    mode="memory", sinks=4, window=32, chunk=16, block_size=8, representatives=2, top_k=3, decode_search_every=4
)


class NoTokenizer:
    """Just enough of a tokenizer for Engine: no special tokens, so no stop ids."""

    eos_token_id = None
    unk_token_id = None

    def convert_tokens_to_ids(self, name: str) -> None:
        return None


def tiny_engine(tiny: LoadedModel, memory: MemorySettings = SMALL) -> Engine:
    return Engine(dataclasses.replace(tiny, tokenizer=NoTokenizer()), memory)


def prompt(seed: int, n: int, vocab: int = 512) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


async def read_in_scheduler(engine: Engine, state, ids: list[int]) -> None:
    """Read ``ids`` into ``state`` through the scheduler's packed forwards (16-token chunks), no reply."""
    from memllm.sampling import SamplingParams
    from memllm.serving import GenerateJob, Scheduler

    sched = Scheduler(engine, prefill_budget=16)
    try:
        async for _ in sched.submit(GenerateJob(SamplingParams(max_tokens=0), frozenset(), ids), state, ids):
            pass
    finally:
        await sched.close()

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

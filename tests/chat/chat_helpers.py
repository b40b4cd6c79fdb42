"""Helpers shared by the chat tests and their child processes (no pytest imports)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from memllm.engine import Engine
from memllm.loading import LoadedModel, resolve_model_dir
from memllm.settings import MemorySettings, Settings
from memllm.testing import test_data_dir, tiny_loaded_model

# small geometry so a few short turns already push blocks out of the window
SMALL_MEMORY = MemorySettings(
    mode="memory", sinks=8, window=64, chunk=32, block_size=16, representatives=2, top_k=4, decode_search_every=4
)


def real_tokenizer():
    from transformers import AutoTokenizer

    _, folder = resolve_model_dir(Settings(data_dir=test_data_dir()))
    return AutoTokenizer.from_pretrained(folder)


def tiny_chat_model(seed: int = 0) -> LoadedModel:
    """A 2-layer random-weight Llama over SmolLM2's vocabulary, with SmolLM2's tokenizer/template."""
    torch.manual_seed(seed)
    loaded = tiny_loaded_model(seed, layers=2, vocab=49152)
    return dataclasses.replace(loaded, tokenizer=real_tokenizer())


async def migrated_store(url: str, data_dir: Path):
    from memllm_storage import migrate
    from memllm_storage.engine import make_engine
    from memllm_storage.store import MemoryStore

    eng = make_engine(url)
    await migrate.upgrade(eng)
    await eng.dispose()
    return await MemoryStore.open(url, data_dir, checkpoint_fraction=0.0)


def make_service(loaded: LoadedModel, store, memory: MemorySettings = SMALL_MEMORY, **kwargs):
    """A chat service whose sessions read with ``memory`` as it is (no ``MEMLLM_CHAT_MEMORY`` changes
    unless ``memory_changes`` is given)."""
    from memllm.chat.service import ChatService

    kwargs.setdefault("memory_changes", {})
    return ChatService(Engine(loaded, memory), store, **kwargs)

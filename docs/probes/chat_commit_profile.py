"""Probe (not a test, not a benchmark command): the cost of reading messages into a chat session as
it grows, and a cProfile of the last messages' commit path.

A tiny random-weight model with 30 layers (the bundled model's layer count, so the store keeps 30
indexes) over SmolLM2's tokenizer, the default memory geometry (window 2048, blocks of 128, top-32),
a fresh SQLite store; ~700-token messages appended one commit each. The model is tiny, so what is
left is attention geometry and storage.

    MEMLLM_THREADS=1 .venv/bin/python docs/probes/chat_commit_profile.py 14    # messages
"""

from __future__ import annotations

import asyncio
import cProfile
import dataclasses
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "chat"))
from chat_helpers import migrated_store, real_tokenizer

from memllm.chat.service import ChatService
from memllm.engine import Engine
from memllm.settings import MemorySettings
from memllm.testing import tiny_loaded_model

PROFILED = 8  # the last messages, profiled


async def main(n_messages: int) -> None:
    torch.set_num_threads(1)
    loaded = dataclasses.replace(tiny_loaded_model(0, layers=30, vocab=49152), tokenizer=real_tokenizer())
    text = " ".join(f"word{i}" for i in range(200))
    with tempfile.TemporaryDirectory() as tmp:
        store = await migrated_store(f"sqlite+aiosqlite:///{tmp}/probe.db", Path(tmp) / "data")
        svc = ChatService(Engine(loaded, MemorySettings()), store)
        info = await svc.create("probe")
        prof = cProfile.Profile()
        for k in range(n_messages):
            if k == n_messages - PROFILED:
                prof.enable()
            t = time.perf_counter()
            await svc.append_messages(info.id, [{"role": "user" if k % 2 == 0 else "assistant", "content": text}])
            if k % 10 == 0:
                tokens = (await svc.get(info.id)).token_count
                print(f"message {k}: {tokens} tokens of history, {1000 * (time.perf_counter() - t):.0f} ms", flush=True)
        prof.disable()
        print(f"cProfile of the last {PROFILED} messages (cumulative s over all {PROFILED}):")
        pstats.Stats(prof).sort_stats("cumulative").print_stats(r"storage|service.py:\d+\(_commit", 25)
        await store.close()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 14))

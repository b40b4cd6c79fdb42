"""Child process of the chat crash tests: commits turns, then is SIGKILLed during the next one.

usage: chat_crash_child.py DB_URL DATA_DIR SESSION_NAME TURNS midturn|crashpoint

Prints ``COMMITTED <i>`` after each committed turn. ``midturn``: during turn TURNS+1 prints
``MIDTURN`` after the first streamed piece and waits to be killed; ``crashpoint``: the storage crash
point named by MEMLLM_CRASHPOINT stops it (print + wait, or kill itself).
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch
from chat_helpers import make_service, tiny_chat_model

from memllm.sampling import SamplingParams
from memllm_storage.store import MemoryStore

PARAMS = SamplingParams(max_tokens=10)


def turn_text(i: int) -> str:
    return f"Turn {i}: please remember that box {i} holds {i * 7} marbles."


async def main(url: str, data_dir: str, name: str, turns: int, scenario: str) -> None:
    torch.set_num_threads(1)
    store = await MemoryStore.open(url, Path(data_dir), checkpoint_fraction=0.0)
    service = make_service(tiny_chat_model(), store)
    found = await service.find(name)
    sid = found.id if found else (await service.create(name)).id
    for i in range(turns):
        await service.reply(sid, turn_text(i), PARAMS)
        print(f"COMMITTED {i}", flush=True)
    turn = service.turn(sid, turn_text(turns), SamplingParams(max_tokens=40))
    async for _ in turn.stream():
        if scenario == "midturn":
            print("MIDTURN", flush=True)
            while True:
                time.sleep(60)
    print("DONE", flush=True)


if __name__ == "__main__":
    url, data_dir, name, turns, scenario = sys.argv[1:6]
    asyncio.run(main(url, data_dir, name, int(turns), scenario))

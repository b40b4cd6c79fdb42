"""``memllm bench chat-latency`` on the tiny chat model: the long session's turns alternate with
fresh sessions' first turns, each length is a checkpoint of one session, and the fresh sessions
leave nothing behind."""

from __future__ import annotations

import statistics

from chat_helpers import SMALL_MEMORY

from memllm.bench.chat_latency import measure
from memllm.engine import Engine


async def test_chat_latency_times_both_sides_alternating_at_each_length(tiny_chat):
    engine = Engine(tiny_chat, SMALL_MEMORY)
    result = await measure(engine, [300, 700], repeats=3, message_tokens=100, breakdown=True, log=lambda _: None)
    first, last = result["checkpoints"]
    assert 300 <= first["history_tokens"] < last["history_tokens"] and last["history_tokens"] >= 700
    assert 0 < first["memory_blocks"] < last["memory_blocks"] == result["memory_blocks"]
    for c in (first, last):
        assert len(c["ttft_s"]) == len(c["ttft_empty_s"]) == 3 and min(c["ttft_s"] + c["ttft_empty_s"]) > 0
        assert c["ratio"] == statistics.median(c["ttft_s"]) / statistics.median(c["ttft_empty_s"])
    assert result["ttft_history_s"] == last["ttft_s"] and result["ratio"] == last["ratio"]
    assert set(result["ttft_history_by_top_k_s"]) == {"top_k=0", f"top_k={SMALL_MEMORY.top_k}"}
    assert result["ttft_after_spill_s"] > 0 and result["ttft_after_crash_s"] > 0

"""``memllm bench batch``: aggregate decode tokens/s of 1, 2, 4, ... concurrent streams.

In process, on the configured model, through the real :class:`~memllm.serving.scheduler.Scheduler`:
for each stream count B, B plain generation jobs (greedy, stop ids ignored so that every stream
decodes exactly ``max_tokens`` tokens) with different short chat prompts are submitted together.
Decode throughput counts only the decode steps whose batch held all B streams (timed by the
scheduler's ``on_step`` around each step's forward), so prompt reading and ramp-up do not dilute it:
aggregate tok/s = B / the median step time (the median resists other processes' bursts on a shared
machine); per stream = aggregate / B; speedup = aggregate / the 1-stream aggregate.
``e2e_tok_s``: all tokens / wall time from submit to the last Done, prompts included. Decode reads
every weight once per step whatever B is, so the speedup is the figure that matters for serving
many users.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from pathlib import Path

import torch

from memllm.bench.common import format_table, machine_info, write_json
from memllm.engine import Engine
from memllm.sampling import SamplingParams
from memllm.serving.jobs import GenerateJob
from memllm.serving.scheduler import Done, Scheduler

TOPICS = [
    "the tides", "volcanoes", "bread", "the moon", "honeybees", "glaciers", "lighthouses", "chess",
    "coral reefs", "printing", "owls", "the Silk Road", "rainbows", "compasses", "tea", "whales",
]  # fmt: skip


def prompts(engine: Engine, n: int) -> list[list[int]]:
    """n different short chat prompts (about 30 tokens each)."""
    return [
        engine.chat_ids([{"role": "user", "content": f"Tell me everything you know about {TOPICS[i % len(TOPICS)]}."}])
        for i in range(n)
    ]


async def measure(sched: Scheduler, engine: Engine, streams: int, max_tokens: int, mode: str | None) -> dict:
    """One row: ``streams`` jobs decoded together (see the module docstring)."""
    steps: list[tuple[int, float]] = []
    sched.on_step = lambda n, s: steps.append((n, s))
    params = SamplingParams(max_tokens=max_tokens)
    jobs = [(GenerateJob(params, (), ids), engine.new_state(mode), ids) for ids in prompts(engine, streams)]
    t0 = time.perf_counter()
    handles = [sched.submit(*job) for job in jobs]
    dones: list[Done] = [await h.result() for h in handles]
    wall = time.perf_counter() - t0
    step_s = statistics.median(s for n, s in steps if n == streams)
    aggregate = streams / step_s
    return {
        "streams": streams,
        "aggregate_tok_s": aggregate,
        "per_stream_tok_s": aggregate / streams,
        "step_ms": 1000 * step_s,
        "ttft_s": sum(d.ttft_s or 0.0 for d in dones) / streams,
        "e2e_tok_s": sum(d.completion_tokens for d in dones) / wall,
    }


async def sweep(
    engine: Engine, streams: list[int], max_tokens: int, mode: str | None, threads: int | None
) -> list[dict]:
    """Every row on one long-lived scheduler (its model thread and OpenMP team stay warm)."""
    sched = Scheduler(engine, max_batch=max(streams), threads=threads)
    try:
        for b in sorted(set(streams)):  # warm-up: every batch shape once
            await measure(sched, engine, b, 3, mode)
        rows = []
        for b in streams:
            row = await measure(sched, engine, b, max_tokens, mode)
            row["speedup"] = row["aggregate_tok_s"] / rows[0]["aggregate_tok_s"] if rows else 1.0
            rows.append(row)
            print(format_table([row]), flush=True)
        return rows
    finally:
        await sched.close()


def run(
    engine: Engine, streams: list[int], max_tokens: int, mode: str | None, out: Path, threads: int | None = None
) -> list[dict]:
    """The table (rows in ``streams`` order; speedup against the first row). ``threads``: the model
    thread's intra-op threads (see :class:`~memllm.serving.scheduler.Scheduler`)."""
    rows = asyncio.run(sweep(engine, streams, max_tokens, mode, threads))
    write_json(
        out,
        {
            "bench": "batch",
            "machine": machine_info(),
            "dtype": str(engine.model.dtype),
            "mode": mode or engine.memory_settings.mode,
            "max_tokens": max_tokens,
            "threads": threads or torch.get_num_threads(),
            "rows": rows,
        },
    )
    return rows

"""``memllm bench chat-latency``: time to first token with an empty vs a long chat history.

One run: a session with no history answers a short question (a fresh session per repeat); a second
session is filled with ``--history-tokens`` of real text (a Gutenberg book, as alternating user /
assistant messages read through the model and persisted as session memory), then answers the same
question ``--repeats`` times with its live state warm. The history is not re-read on a turn; only
the turn's own tokens are, attending over the window plus retrieved memory blocks. Prints both
medians and their ratio (target: at most 1.3x). Also reported, not part of the ratio, the first
turn after the session's live state left memory: restored from its spill (a graceful restart, or
the session pushed out of the live cache), and re-read from the database (after a crash).
``--breakdown`` also times the long history's turn retrieving 0 blocks per layer (sinks + window
only) and 8 (instead of the default 32): how much of the ratio the window and the memory cost.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import click

QUESTION = "In one sentence, what were we just talking about?"


async def measure(
    engine, history_tokens: int, repeats: int, message_tokens: int = 400, breakdown: bool = False, log=print
) -> dict:
    from memllm.bench.common import book_text, eval_data_dir
    from memllm.chat.service import ChatService
    from memllm.evals.conversations import _migrate
    from memllm.sampling import SamplingParams
    from storage.store import MemoryStore

    params = SamplingParams(max_tokens=1)
    with tempfile.TemporaryDirectory(prefix="memllm-bench-") as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/bench.db"
        await _migrate(url)
        store = await MemoryStore.open(url, Path(tmp) / "data")
        try:
            svc = ChatService(engine, store, mode="memory", max_live=repeats + 1)  # no spill while timing
            empty = []
            for i in range(repeats):
                info = await svc.create(f"empty-{i}")
                empty.append((await svc.reply(info.id, QUESTION, params)).ttft_s)
            log(f"empty history: first token {statistics.median(empty):.3f} s (median of {repeats})")

            long = await svc.create("long")
            ids = engine.encode(book_text(eval_data_dir() / "gutenberg" / "moby_dick.txt"))
            messages = []
            for i in range(-(-history_tokens // message_tokens)):
                start = (i * message_tokens) % max(1, len(ids) - message_tokens)  # wraps around the book
                role = "user" if i % 2 == 0 else "assistant"
                messages.append({"role": role, "content": engine.tokenizer.decode(ids[start : start + message_tokens])})
            t0 = time.perf_counter()
            read = 0

            def progress(n: int) -> None:
                nonlocal read
                read += n
                if read // 10_000 != (read - n) // 10_000:
                    log(f"  read {read} tokens of history ({read / (time.perf_counter() - t0):.0f} tok/s)")

            await svc.append_messages(long.id, messages, progress=progress)
            fill_s = time.perf_counter() - t0
            info = await svc.get(long.id)
            log(f"history: {info.token_count} tokens in {info.message_count} messages, read in {fill_s:.0f} s")
            warm = [(await svc.reply(long.id, QUESTION, params)).ttft_s for _ in range(repeats)]
            parts = {}
            if breakdown:  # the same turn retrieving fewer blocks per layer: what the fixed cost is made of
                state = svc._live[long.id].state
                default = state.top_k
                for k in (0, 8):
                    state.top_k = tuple(min(k, d) for d in default)
                    parts[f"top_k={k}"] = [(await svc.reply(long.id, QUESTION, params)).ttft_s for _ in range(repeats)]
                state.top_k = default
            await svc.close()  # every live state to disk, as at a graceful shutdown
            restored = (await svc.reply(long.id, QUESTION, params)).ttft_s
            svc.drop_live(long.id)  # a crash: that turn made the spill stale, the window is re-read
            cold = (await svc.reply(long.id, QUESTION, params)).ttft_s
            blocks = svc._live[long.id].source.num_blocks()
        finally:
            await store.close()
    return {
        "history_tokens": info.token_count,
        "memory_blocks": blocks,
        "ttft_empty_s": empty,
        "ttft_history_s": warm,
        "ttft_history_by_top_k_s": parts,
        "ttft_after_spill_s": restored,
        "ttft_after_crash_s": cold,
        "ratio": statistics.median(warm) / statistics.median(empty),
        "fill_s": fill_s,
    }


@click.command("chat-latency")
@click.option("--history-tokens", default="100k", show_default=True, help="history length (k suffix ok)")
@click.option("--repeats", default=3, show_default=True)
@click.option(
    "--breakdown",
    is_flag=True,
    help="also time the long history's turn retrieving 0 (window only) and 8 blocks per layer",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("bench-results/chat_latency.json"), show_default=True
)
def chat_latency(history_tokens: str, repeats: int, breakdown: bool, out: Path) -> None:
    """Time to first token: empty history vs a long one (one run; prints the ratio)."""
    from memllm.bench.common import machine_info, parse_sizes, write_json
    from memllm.engine import Engine
    from memllm.loading import load_model
    from memllm.settings import get_settings

    settings = get_settings()
    engine = Engine(load_model(settings), settings.memory, retrieval=settings.retrieval)
    n = parse_sizes(history_tokens)[0]
    result = asyncio.run(measure(engine, n, repeats, breakdown=breakdown, log=lambda s: click.echo(s, err=True)))
    click.echo(
        f"time to first token: empty history {statistics.median(result['ttft_empty_s']):.3f} s, "
        f"{result['history_tokens']} tokens of history {statistics.median(result['ttft_history_s']):.3f} s "
        f"-> ratio {result['ratio']:.2f}x (target <= 1.3x)"
    )
    empty = statistics.median(result["ttft_empty_s"])
    for label, times in result["ttft_history_by_top_k_s"].items():
        median = statistics.median(times)
        click.echo(f"  the same turn with {label}: {median:.3f} s ({median / empty:.2f}x)")
    click.echo(
        f"first turn after the live state left memory: restored from its spill {result['ttft_after_spill_s']:.3f} s, "
        f"re-read from the database (a crash) {result['ttft_after_crash_s']:.3f} s"
    )
    memory = {k: getattr(settings.memory, k) for k in ("sinks", "window", "chunk", "block_size", "top_k")}
    write_json(out, {**result, "machine": machine_info(), "memory": memory})
    click.echo(f"wrote {out}")

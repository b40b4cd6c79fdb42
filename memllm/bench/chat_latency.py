"""``memllm bench chat-latency``: time to first token with an empty vs a long chat history.

One run: a session is filled with ``--history-tokens`` of real text (a Gutenberg book, as
alternating user / assistant messages read through the model and persisted as session memory), then
answers a short question ``--repeats`` times with its live state warm, each turn right after the
first turn of a fresh session (empty history) asking the same, so that the two sides of the ratio
are measured side by side (several lengths, ``10k,50k,100k``: the same session is read up to each in
turn and timed there, so the flat curve is measured in one run).
The history is not re-read on a turn; only the turn's own tokens are, attending over the window
plus retrieved memory blocks. Prints a table of the medians and their ratios to the empty history
(target: at most 1.3x at 100K). Also reported, not part of the ratio, the first
turn after the session's live state left memory: restored from its spill (a graceful restart, or
the session pushed out of the live cache), and re-read from the database (after a crash).
The sessions read with the chat sessions' memory settings (``MEMLLM_CHAT_MEMORY``: 8 blocks per layer).
``--breakdown`` also times the long history's turn retrieving 0 blocks per layer (sinks + window
only) and the engine's ``top_k`` (32, what a chat turn retrieved before commit fd97283): how much of the
ratio the window and the memory cost.
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
    engine,
    history_tokens: int | list[int],
    repeats: int,
    message_tokens: int = 400,
    breakdown: bool = False,
    log=print,
) -> dict:
    """One run: one session read up to each of ``history_tokens`` (ascending) in turn; at each, its
    warm turns alternate with the first turns of fresh sessions (empty history), so that both sides
    of the ratio see the same machine (a shared machine drifts by 10-20% within minutes). The rest at
    the last length."""
    from memllm.bench.common import book_text, eval_data_dir
    from memllm.chat.service import ChatService
    from memllm.evals.conversations import _migrate
    from memllm.sampling import SamplingParams
    from memllm_storage.store import MemoryStore

    lengths = sorted([history_tokens] if isinstance(history_tokens, int) else history_tokens)
    params = SamplingParams(max_tokens=1)
    with tempfile.TemporaryDirectory(prefix="memllm-bench-") as tmp:
        url = f"sqlite+aiosqlite:///{tmp}/bench.db"
        await _migrate(url)
        store = await MemoryStore.open(url, Path(tmp) / "data")
        try:
            svc = ChatService(engine, store, mode="memory", max_live=3)  # the long session stays live
            fresh = 0

            async def empty_turn() -> float:
                """A fresh session's first turn; the session is deleted after (nothing piles up)."""
                nonlocal fresh
                fresh += 1
                info = await svc.create(f"empty-{fresh}")
                ttft = (await svc.reply(info.id, QUESTION, params)).ttft_s
                await svc.delete(info.id)
                return ttft

            async def side_by_side(session_id: int) -> tuple[list[float], list[float]]:
                """``repeats`` pairs: a fresh session's first turn, then the long session's next turn."""
                for _ in range(2):  # warm-up, not timed
                    await empty_turn()
                    await svc.reply(session_id, QUESTION, params)
                pairs = [
                    (await empty_turn(), (await svc.reply(session_id, QUESTION, params)).ttft_s) for _ in range(repeats)
                ]
                return [e for e, _ in pairs], [h for _, h in pairs]

            long = await svc.create("long")
            ids = engine.encode(book_text(eval_data_dir() / "gutenberg" / "moby_dick.txt"))
            t0 = time.perf_counter()
            read, sent, checkpoints = 0, 0, []

            def progress(n: int) -> None:
                nonlocal read
                read += n
                if read // 10_000 != (read - n) // 10_000:
                    log(f"  read {read} tokens of history ({read / (time.perf_counter() - t0):.0f} tok/s)")

            for length in lengths:
                messages = []
                while sent * message_tokens < length:
                    start = (sent * message_tokens) % max(1, len(ids) - message_tokens)  # wraps around the book
                    role = "user" if sent % 2 == 0 else "assistant"
                    text = engine.tokenizer.decode(ids[start : start + message_tokens])
                    messages.append({"role": role, "content": text})
                    sent += 1
                await svc.append_messages(long.id, messages, progress=progress)
                fill_s = time.perf_counter() - t0
                info = await svc.get(long.id)
                log(f"history: {info.token_count} tokens in {info.message_count} messages, read in {fill_s:.0f} s")
                empty, warm = await side_by_side(long.id)
                blocks = svc._live[long.id].source.num_blocks()
                checkpoints.append(
                    {
                        "history_tokens": info.token_count,
                        "memory_blocks": blocks,
                        "ttft_empty_s": empty,
                        "ttft_s": warm,
                        "ratio": statistics.median(warm) / statistics.median(empty),
                    }
                )
                log(
                    f"  first token {statistics.median(warm):.3f} s, empty history {statistics.median(empty):.3f} s "
                    f"({checkpoints[-1]['ratio']:.2f}x)"
                )
            parts = {}
            if breakdown:  # the same turn retrieving other numbers of blocks per layer: what the cost is made of
                state = svc._live[long.id].state
                default = state.top_k
                for k in (0, engine.memory_settings.top_k):
                    state.top_k = (k,) * len(default)
                    empty, warm = await side_by_side(long.id)
                    parts[f"top_k={k}"] = {"ttft_empty_s": empty, "ttft_s": warm}
                state.top_k = default
            await svc.close()  # every live state to disk, as at a graceful shutdown
            restored = (await svc.reply(long.id, QUESTION, params)).ttft_s
            svc.drop_live(long.id)  # a crash: that turn made the spill stale, the window is re-read
            cold = (await svc.reply(long.id, QUESTION, params)).ttft_s
        finally:
            await store.close()
    last = checkpoints[-1]
    return {
        "history_tokens": last["history_tokens"],
        "memory_blocks": last["memory_blocks"],
        "ttft_empty_s": last["ttft_empty_s"],
        "ttft_history_s": last["ttft_s"],
        "ratio": last["ratio"],
        "checkpoints": checkpoints,
        "ttft_history_by_top_k_s": parts,
        "ttft_after_spill_s": restored,
        "ttft_after_crash_s": cold,
        "fill_s": fill_s,
    }


@click.command("chat-latency")
@click.option(
    "--history-tokens",
    default="100k",
    show_default=True,
    help="history length, or several (10k,100k): one session read up to each in turn, timed at each",
)
@click.option("--repeats", default=3, show_default=True)
@click.option(
    "--breakdown",
    is_flag=True,
    help="also time the long history's turn retrieving 0 (window only) and the engine's top_k blocks per layer",
)
@click.option(
    "--out", type=click.Path(path_type=Path), default=Path("bench-results/chat_latency.json"), show_default=True
)
def chat_latency(history_tokens: str, repeats: int, breakdown: bool, out: Path) -> None:
    """Time to first token: empty history vs long ones (one run; prints the ratios)."""
    from memllm.bench.common import format_table, machine_info, parse_sizes, write_json
    from memllm.engine import Engine
    from memllm.loading import load_model
    from memllm.settings import get_settings

    settings = get_settings()
    engine = Engine(load_model(settings), settings.memory, retrieval=settings.retrieval)
    lengths = parse_sizes(history_tokens)
    log = lambda s: click.echo(s, err=True)  # noqa: E731
    result = asyncio.run(measure(engine, lengths, repeats, breakdown=breakdown, log=log))
    rows = []
    for c in result["checkpoints"]:
        median, empty = statistics.median(c["ttft_s"]), statistics.median(c["ttft_empty_s"])
        rows.append(
            {
                "history tokens": c["history_tokens"],
                "memory blocks": c["memory_blocks"],
                "first token s": round(median, 3),
                "empty history s (alternating)": round(empty, 3),
                "x empty": round(c["ratio"], 2),
            }
        )
    click.echo(format_table(rows))
    empty = statistics.median(result["ttft_empty_s"])
    click.echo(
        f"time to first token: empty history {empty:.3f} s, "
        f"{result['history_tokens']} tokens of history {statistics.median(result['ttft_history_s']):.3f} s "
        f"-> ratio {result['ratio']:.2f}x (target <= 1.3x)"
    )
    for label, times in result["ttft_history_by_top_k_s"].items():
        median, empty = statistics.median(times["ttft_s"]), statistics.median(times["ttft_empty_s"])
        click.echo(f"  the same turn with {label}: {median:.3f} s, empty history {empty:.3f} s ({median / empty:.2f}x)")
    click.echo(
        f"first turn after the live state left memory: restored from its spill {result['ttft_after_spill_s']:.3f} s, "
        f"re-read from the database (a crash) {result['ttft_after_crash_s']:.3f} s"
    )
    memory = {k: getattr(settings.memory, k) for k in ("sinks", "window", "chunk", "block_size", "top_k")}
    memory["chat_memory"] = settings.chat_memory
    write_json(out, {**result, "machine": machine_info(), "memory": memory})
    click.echo(f"wrote {out}")

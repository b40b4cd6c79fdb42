"""CPU timing: the block-sparse torch path per pattern against dense attention, 2K..32K tokens.

    python -m memllm_kernels.bench_cpu [--lengths 2048 4096 ...] [--threads 1] [--clock cpu|wall]

Shapes follow SmolLM2-135M (batch 1, 9 query heads, 3 kv heads, head_dim 64, float32). Dense
baselines: torch SDPA causal (fused, no mask) for full attention, and the reference (dense masked
softmax, O(T^2) memory) for the patterns up to --dense-max tokens. Quadratic patterns (full,
strided, fixed) stop at --quadratic-max to keep the run short. Prints a table (seconds per call,
one call after a warm-up at 512 tokens) and writes JSON with --json.

Clock: ``cpu`` (default) is this process's CPU time, which on a shared machine with one thread
measures the work and not the waiting; ``wall`` is elapsed time (use it on an idle machine, and
with several threads).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from memllm_kernels.bench_setup import MemorySetup, bench_patterns
from memllm_kernels.cpu_blocked import blocked_attention, blocked_memory_attention
from memllm_kernels.layouts import build_layout
from memllm_kernels.reference import expand_kv, pattern_attention

QUADRATIC = ("full", "strided", "fixed")


CLOCKS = {"cpu": time.process_time, "wall": time.perf_counter}


def _timer(repeat: int, clock: str):
    """A function timing a callable: best of ``repeat`` calls, in seconds of ``clock``."""
    now = CLOCKS[clock]

    def measure(fn) -> float:
        best = float("inf")
        for _ in range(repeat):
            t0 = now()
            fn()
            best = min(best, now() - t0)
        return best

    return measure


def bench_length(
    t: int, quadratic_max: int, dense_max: int, repeat: int = 1, clock: str = "cpu", seed: int = 0
) -> dict:
    """Seconds per call of every pattern (blocked), dense baselines and memory attention at ``t`` tokens."""
    hq, hkv, d = 9, 3, 64
    _time = _timer(repeat, clock)
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, t, d, generator=gen)
    k = torch.randn(1, hkv, t, d, generator=gen)
    v = torch.randn(1, hkv, t, d, generator=gen)
    row: dict = {"tokens": t, "sdpa_causal": None}
    if t <= quadratic_max:
        ke, ve = expand_kv(k, hq), expand_kv(v, hq)
        row["sdpa_causal"] = _time(lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True))
    for pat in bench_patterns():
        if pat.kind in QUADRATIC and t > quadratic_max:
            row[pat.name] = None
            continue
        blocked_attention(q[:, :, :512], k[:, :, :512], v[:, :, :512], pat)  # warm-up
        row[pat.name] = _time(lambda pat=pat: blocked_attention(q, k, v, pat))
        row[f"{pat.name}:density"] = build_layout(pat, t, t, 128, 128).density()
        if t <= dense_max and not pat.is_full:
            row[f"{pat.name}:dense_ref"] = _time(lambda pat=pat: pattern_attention(q, k, v, pat))
    mem = MemorySetup()
    pool_k, pool_v, ids = mem.inputs(k, v)
    row[mem.name] = _time(
        lambda: blocked_memory_attention(q, k, v, pool_k, pool_v, ids, local=mem.local, chunk_size=mem.chunk)
    )
    return row


def run(
    lengths: list[int], threads: int, quadratic_max: int, dense_max: int, repeat: int = 1, clock: str = "cpu"
) -> list[dict]:
    torch.set_num_threads(threads)
    rows = []
    for t in lengths:
        rows.append(bench_length(t, quadratic_max, dense_max, repeat, clock))
        print_row(rows[-1])
    return rows


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def print_row(row: dict) -> None:
    names = [p.name for p in bench_patterns()] + [MemorySetup().name]
    parts = [f"T={row['tokens']}", f"sdpa_causal={_fmt(row['sdpa_causal'])}"]
    for n in names:
        dense = row.get(f"{n}:dense_ref")
        parts.append(f"{n}={_fmt(row.get(n))}" + (f" (dense {_fmt(dense)})" if dense is not None else ""))
    print("  ".join(parts), flush=True)


def markdown_table(rows: list[dict]) -> str:
    """Seconds per call; columns are patterns, rows lengths; dense reference in parentheses."""
    names = [p.name for p in bench_patterns()] + [MemorySetup().name]
    head = "| tokens | SDPA causal (dense) | " + " | ".join(f"{n} (blocked)" for n in names) + " |"
    sep = "|" + "---|" * (len(names) + 2)
    lines = [head, sep]
    for row in rows:
        cells = [str(row["tokens"]), _fmt(row["sdpa_causal"])]
        for n in names:
            cell = _fmt(row.get(n))
            if row.get(f"{n}:dense_ref") is not None:
                cell += f" ({_fmt(row[f'{n}:dense_ref'])})"
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    ap.add_argument("--quadratic-max", type=int, default=16384)
    ap.add_argument("--dense-max", type=int, default=4096, help="longest length for the dense reference")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    rows = run(args.lengths, args.threads, args.quadratic_max, args.dense_max, args.repeat, args.clock)
    print()
    print(markdown_table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

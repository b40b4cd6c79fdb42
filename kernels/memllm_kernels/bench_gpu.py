"""GPU benchmark of the Triton kernels, ready for one call on an H200:

    python -m memllm_kernels.bench_gpu [--json results.json] [--lengths 8192 ... 131072]
    python -m memllm_kernels.bench_gpu --cpu-smoke      # tiny sizes, Triton interpreter on CPU: checks it runs

1. Check: every pattern's block-sparse kernel and the memory kernel against the torch reference at
   a small size, for float16 and bfloat16 and head_dim 64 and 128 (key masses included once).
2. Time: each pattern (Triton block-sparse), memory attention (Triton, pool read in place) and
   torch's dense causal SDPA (flash) at 8K..128K tokens; batch 1, 32 query heads, 8 kv heads,
   head_dim 128, bfloat16 (a Llama-3-8B layer). TFLOP/s counts only visible (query, key) pairs
   (4 * D FLOPs each), so a sparse pattern's TFLOP/s is comparable to dense SDPA's.

Prints a table, writes JSON (--json), exits 1 if any check failed (after timing anyway).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

GPU_LENGTHS = [8192, 16384, 32768, 65536, 131072]


def _config(smoke: bool) -> dict:
    from memllm_kernels import patterns as P
    from memllm_kernels.bench_setup import MemorySetup, bench_patterns

    if smoke:
        return {
            "device": "cpu",
            "heads": (2, 1),
            "head_dim": 64,
            "dtype": "float16",
            "lengths": [64],
            "reps": 1,
            "check_len": 80,
            "check_grid": [("bfloat16", 32)],
            "patterns": [
                P.full(),
                P.sliding_window(32),
                P.longformer(32, 8),
                P.bigbird(32, 8, 2, random_block=16),
                P.strided(16),
                P.fixed(32, 8),
            ],
            "memory": MemorySetup(n_sinks=8, window=32, chunk=32, block=16, n_sel=2),
        }
    return {
        "device": "cuda",
        "heads": (32, 8),
        "head_dim": 128,
        "dtype": "bfloat16",
        "lengths": GPU_LENGTHS,
        "reps": 3,
        "check_len": 1000,
        "check_grid": [("float16", 64), ("float16", 128), ("bfloat16", 64), ("bfloat16", 128)],
        "patterns": bench_patterns(window=4096, n_global=128, stride=2048),
        "memory": MemorySetup(n_sinks=128, window=4096, chunk=512, block=128, n_sel=32),
    }


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: str, min_reps: int = 3) -> float:
    """Median seconds per call after one warm-up (which also compiles): min_reps calls, more within 1 s."""
    fn()
    _sync(device)
    times: list[float] = []
    budget_s = 1.0 if device == "cuda" else 0.0
    while len(times) < min_reps or (sum(times) < budget_s and len(times) < 20):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _rand(shape, dtype, device, gen):
    import torch

    return torch.randn(shape, generator=gen).to(dtype).to(device)


def check(cfg: dict) -> list[dict]:
    """Triton vs reference at a small size; one row per (kernel, dtype, head_dim)."""
    import torch

    from memllm_kernels.reference import memory_attention, pattern_attention
    from memllm_kernels.triton_block_sparse import triton_attention
    from memllm_kernels.triton_memory import triton_memory_attention

    device, t = cfg["device"], cfg["check_len"]
    hq, hkv = cfg["heads"]
    rows = []
    for dtype_name, d in cfg["check_grid"]:
        dtype = getattr(torch, dtype_name)
        tol = 4e-3 if dtype == torch.float16 else 3e-2
        gen = torch.Generator().manual_seed(0)
        q, k, v = (_rand((1, h, t, d), dtype, device, gen) for h in (hq, hkv, hkv))
        for i, pat in enumerate(cfg["patterns"]):
            mass = i == 1
            want = pattern_attention(q, k, v, pat, return_key_mass=mass)
            got = triton_attention(q, k, v, pat, return_key_mass=mass)
            err = (got.out.float() - want.out.float()).abs().max().item()
            lse_err = (got.lse - want.lse).abs().max().item()
            mass_err = (got.key_mass - want.key_mass).abs().max().item() if mass else 0.0
            ok = err <= tol * (1 + want.out.float().abs().max().item()) and lse_err < 1e-3 and mass_err < 1e-3
            rows.append(dict(kernel=pat.name, dtype=dtype_name, head_dim=d, out_err=err, lse_err=lse_err,
                             mass_err=mass_err, ok=bool(ok)))  # fmt: skip
        mem = cfg["memory"]
        tm = (t // mem.block) * mem.block
        qm, km, vm = q[:, :, :tm], k[:, :, :tm], v[:, :, :tm]
        pool_k, pool_v, ids = mem.inputs(km, vm)
        ids = ids.clone()
        ids[..., 0] = torch.where(ids[..., 0] < 0, 0, ids[..., 0])  # make sure memory is exercised
        kw = dict(local=mem.local, chunk_size=mem.chunk, return_key_mass=True)
        want = memory_attention(qm, km, vm, pool_k, pool_v, ids, **kw)
        got = triton_memory_attention(qm, km, vm, pool_k, pool_v, ids, **kw)
        err = (got.out.float() - want.out.float()).abs().max().item()
        lse_err = (got.lse - want.lse).abs().max().item()
        mass_err = max(
            (got.key_mass - want.key_mass).abs().max().item(),
            (got.memory_mass - want.memory_mass).abs().max().item(),
        )
        ok = err <= tol * (1 + want.out.float().abs().max().item()) and lse_err < 1e-3 and mass_err < 1e-3
        rows.append(dict(kernel=mem.name, dtype=dtype_name, head_dim=d, out_err=err, lse_err=lse_err,
                         mass_err=mass_err, ok=bool(ok)))  # fmt: skip
    return rows


def _sdpa_dense(q, ke, ve):
    """torch's fused causal attention; on CUDA restricted to flash / cuDNN (never the O(T^2) math path)."""
    import torch.nn.functional as F

    if not q.is_cuda:
        return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(q, ke, ve, is_causal=True)


def _time_sdpa(q, k, v, reps: int) -> float:
    """Seconds per dense causal SDPA call, kv heads expanded to the query heads (freed on return)."""
    groups = q.shape[1] // k.shape[1]
    ke, ve = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return _time(lambda: _sdpa_dense(q, ke, ve), q.device.type, reps)


def bench_length(cfg: dict, t: int) -> list[dict]:
    """Time every kernel at ``t`` tokens; one row per kernel."""
    import torch

    from memllm_kernels.bench_setup import attention_flops, visible_pairs
    from memllm_kernels.layouts import build_layout
    from memllm_kernels.triton_block_sparse import triton_attention
    from memllm_kernels.triton_common import default_tiles
    from memllm_kernels.triton_memory import triton_memory_attention

    device, reps = cfg["device"], cfg["reps"]
    hq, hkv = cfg["heads"]
    d = cfg["head_dim"]
    dtype = getattr(torch, cfg["dtype"])
    bm, bn, _, _ = default_tiles(d)
    gen = torch.Generator().manual_seed(t)
    q, k, v = (_rand((1, h, t, d), dtype, device, gen) for h in (hq, hkv, hkv))
    sdpa_sec = _time_sdpa(q, k, v, reps)
    rows = [_row(t, "sdpa_causal (dense)", sdpa_sec, attention_flops(t * (t + 1) // 2, hq, d), 1.0, sdpa_sec)]
    for pat in cfg["patterns"]:
        sec = _time(lambda pat=pat: triton_attention(q, k, v, pat), device, reps)
        flops = attention_flops(visible_pairs(pat, t, device), hq, d)
        density = build_layout(pat, t, t, bm, bn, str(q.device)).density()
        rows.append(_row(t, pat.name, sec, flops, density, sdpa_sec))
    mem = cfg["memory"]
    pool_k, pool_v, ids = mem.inputs(k, v)
    sec = _time(
        lambda: triton_memory_attention(q, k, v, pool_k, pool_v, ids, local=mem.local, chunk_size=mem.chunk),
        device,
        reps,
    )
    rows.append(_row(t, mem.name, sec, attention_flops(mem.visible_pairs(t), hq, d), math.nan, sdpa_sec))
    for r in rows:
        print(_fmt_row(r), flush=True)
    return rows


def bench(cfg: dict) -> list[dict]:
    """Time every kernel at every length; one row per (length, kernel)."""
    return [row for t in cfg["lengths"] for row in bench_length(cfg, t)]


def _row(t: int, kernel: str, sec: float, flops: float, density: float, sdpa_sec: float) -> dict:
    return dict(tokens=t, kernel=kernel, ms=sec * 1e3, tflops=flops / sec / 1e12, tile_density=density,
                speedup_vs_sdpa=sdpa_sec / sec)  # fmt: skip


def _fmt_row(r: dict) -> str:
    return (
        f"| {r['tokens']:>6} | {r['kernel']:<34} | {r['ms']:>10.3f} | {r['tflops']:>8.2f} | "
        f"{r['speedup_vs_sdpa']:>8.2f} | {r['tile_density']:>6.3f} |"
    )


TABLE_HEAD = (
    "| tokens | kernel                             |    time ms | TFLOP/s  | vs SDPA  | tiles  |\n"
    "|-------:|:-----------------------------------|-----------:|---------:|---------:|-------:|"
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--lengths", type=int, nargs="+", default=None)
    ap.add_argument("--check-only", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        if "memllm_kernels.triton_common" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--cpu-smoke must run in a fresh process (TRITON_INTERPRET before triton)")
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu-smoke for the CPU interpreter check")
    torch.manual_seed(0)
    cfg = _config(args.cpu_smoke)
    if args.lengths:
        cfg["lengths"] = args.lengths
    env = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if cfg["device"] == "cuda" else "cpu",
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        raise SystemExit("triton is not installed") from None
    print(f"environment: {env}", flush=True)

    checks = check(cfg)
    print("\ncheck against the reference:")
    for c in checks:
        status = "ok  " if c["ok"] else "FAIL"
        print(f"  {status} {c['kernel']:<34} {c['dtype']:<9} D={c['head_dim']:<4} out {c['out_err']:.2e}  "
              f"lse {c['lse_err']:.2e}  mass {c['mass_err']:.2e}")  # fmt: skip
    rows: list[dict] = []
    if not args.check_only:
        hq, hkv = cfg["heads"]
        print(f"\ntimings: batch 1, {hq} q heads, {hkv} kv heads, D={cfg['head_dim']}, {cfg['dtype']}")
        print(TABLE_HEAD)
        rows = bench(cfg)
    if args.json:
        args.json.write_text(json.dumps({"env": env, "checks": checks, "timings": rows}, indent=1))
    failed = [c for c in checks if not c["ok"]]
    if failed:
        print(f"\n{len(failed)} check(s) FAILED", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Cases for the Triton kernels, shared by the interpreter run (a subprocess) and the CUDA run.

Importing this module does not import triton. Run as a script to execute every case on one device
and write a JSON report (the interpreter test runs it with TRITON_INTERPRET=1 set before triton is
imported, which is why it lives in its own process):

    TRITON_INTERPRET=1 python tests/kernels/kernels_triton_cases.py --device cpu --out report.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, when run as a script

from memllm_kernels import patterns as P

# per-dtype tolerances on the output (atol = rtol); lse and masses are float32 sums
OUT_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}
LSE_TOL = 1e-3
MASS_TOL = 1e-3

F16, BF16 = torch.float16, torch.bfloat16

ATTENTION_CASES: list[dict] = [
    dict(name="full-gqa-mass", pattern=P.full(), shape=(1, 4, 2, 50, 50, 64), dtype=F16, mass=True),
    dict(name="full-chunk-d128", pattern=P.full(), shape=(2, 2, 2, 17, 45, 128), dtype=BF16),
    dict(
        name="window-gqa3-mass",
        pattern=P.sliding_window(20),
        shape=(1, 3, 1, 70, 70, 64),
        dtype=BF16,
        mass=True,
    ),
    dict(name="window-decode", pattern=P.sliding_window(5), shape=(1, 2, 1, 1, 40, 64), dtype=F16),
    dict(
        name="sinks-window-aligned",
        pattern=P.sinks_window(4, 16),
        shape=(1, 2, 1, 64, 64, 128),
        dtype=F16,
        mass=True,
    ),
    dict(name="longformer-wide-global", pattern=P.longformer(9, 20), shape=(1, 2, 2, 45, 45, 64), dtype=BF16),
    dict(
        name="bigbird-mass",
        pattern=P.bigbird(16, 4, 2, random_block=8),
        shape=(1, 2, 1, 80, 80, 64),
        dtype=F16,
        mass=True,
    ),
    dict(
        name="bigbird-chunk-d128",
        pattern=P.bigbird(12, 0, 3, random_block=16, seed=7),
        shape=(1, 2, 1, 30, 90, 128),
        dtype=BF16,
    ),
    dict(name="strided7-mass", pattern=P.strided(7), shape=(1, 2, 1, 60, 60, 64), dtype=F16, mass=True),
    dict(name="strided16", pattern=P.strided(16), shape=(1, 2, 2, 50, 50, 64), dtype=BF16),
    dict(name="fixed16-mass", pattern=P.fixed(16, 4), shape=(1, 2, 1, 70, 70, 64), dtype=F16, mass=True),
    dict(name="fixed10-chunk-d128", pattern=P.fixed(10, 3), shape=(1, 2, 1, 20, 55, 128), dtype=BF16),
    dict(
        name="strided-global-random-d32",
        pattern=P.Pattern("strided", stride=5, n_global=3, n_random=1, random_block=4, seed=9),
        shape=(1, 2, 1, 40, 40, 32),
        dtype=F16,
        mass=True,
    ),
    dict(name="full-strided-views", pattern=P.full(), shape=(1, 2, 1, 40, 40, 64), dtype=F16, views=True),
]

MEMORY_CASES: list[dict] = [
    dict(name="mem-basic-mass", local=P.sinks_window(4, 20), shape=(2, 4, 2, 48, 48, 64), dtype=F16,
         pool=(8, 16), ids=(1, 3), mass=True, q_mem=True),
    dict(name="mem-chunks-perhead-d128", local=P.sinks_window(2, 16), shape=(1, 2, 2, 40, 100, 128),
         dtype=BF16, pool=(6, 24), ids=(3, 2), chunk=16, per_head=True, mass=True, q_mem=True),
    dict(name="mem-pool-is-a-view", local=P.sinks_window(4, 16), shape=(1, 4, 2, 32, 64, 64), dtype=F16,
         pool="view", ids=(2, 2), chunk=16),
    dict(name="mem-decode", local=P.sliding_window(8), shape=(1, 2, 1, 1, 30, 64), dtype=BF16,
         pool=(5, 16), ids=(1, 4), q_mem=True),
    dict(name="mem-empty", local=P.sinks_window(2, 12), shape=(1, 2, 1, 30, 30, 64), dtype=F16,
         pool=(3, 16), ids=(1, 2), empty=True, mass=True),
]  # fmt: skip

CASE_NAMES = [c["name"] for c in ATTENTION_CASES + MEMORY_CASES]


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str, views: bool = False, seed: int = 0):
    b, hq, hkv, tq, tk, d = shape
    gen = torch.Generator().manual_seed(seed)
    if views:  # (B, T, H, D) storage seen as (B, H, T, D): what the model passes before a transpose
        q = torch.randn(b, tq, hq, d, generator=gen).to(dtype).to(device).transpose(1, 2)
        k = torch.randn(b, tk, hkv, d, generator=gen).to(dtype).to(device).transpose(1, 2)
        v = torch.randn(b, tk, hkv, d, generator=gen).to(dtype).to(device).transpose(1, 2)
        return q, k, v
    q = torch.randn(b, hq, tq, d, generator=gen).to(dtype).to(device)
    k = torch.randn(b, hkv, tk, d, generator=gen).to(dtype).to(device)
    v = torch.randn(b, hkv, tk, d, generator=gen).to(dtype).to(device)
    return q, k, v


def _compare(name: str, got: torch.Tensor | None, want: torch.Tensor | None, tol: float) -> float:
    if want is None:
        assert got is None, f"{name}: expected None"
        return 0.0
    assert got is not None and got.shape == want.shape, f"{name}: shape {None if got is None else got.shape}"
    got, want = got.float().cpu(), want.float().cpu()
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = (got - want).abs()
    bad = err > tol + tol * want.abs()
    assert not bad.any(), f"{name}: max error {err.max().item():.3g} exceeds tolerance {tol}"
    return float(err.max())


def run_attention_case(case: dict, device: str) -> dict:
    from memllm_kernels.reference import pattern_attention
    from memllm_kernels.triton_block_sparse import triton_attention

    q, k, v = _inputs(case["shape"], case["dtype"], device, case.get("views", False))
    mass = case.get("mass", False)
    want = pattern_attention(q.cpu(), k.cpu(), v.cpu(), case["pattern"], return_key_mass=mass)
    got = triton_attention(q, k, v, case["pattern"], return_key_mass=mass)
    assert got.out.dtype == q.dtype and got.lse.dtype == torch.float32
    return {
        "out": _compare("out", got.out, want.out, OUT_TOL[case["dtype"]]),
        "lse": _compare("lse", got.lse, want.lse, LSE_TOL),
        "key_mass": _compare("key_mass", got.key_mass, want.key_mass, MASS_TOL),
    }


def memory_inputs(case: dict, device: str):
    """(q, k, v, pool_k, pool_v, block_ids, kwargs) for a memory case."""
    b, _, hkv, _, _, d = case["shape"]
    dtype = case["dtype"]
    q, k, v = _inputs(case["shape"], dtype, device, seed=1)
    gen = torch.Generator().manual_seed(2)
    kwargs: dict = {"local": case["local"]}
    if case["pool"] == "view":  # the pool is another sequence's keys seen as 16-token blocks, no copy
        seq_k = torch.randn(1, hkv, 96, d, generator=gen).to(dtype).to(device)
        seq_v = torch.randn(1, hkv, 96, d, generator=gen).to(dtype).to(device)
        pool_k = seq_k[0].unflatten(1, (6, 16)).transpose(0, 1)  # (6, Hkv, 16, D) strided view
        pool_v = seq_v[0].unflatten(1, (6, 16)).transpose(0, 1)
        assert pool_k.data_ptr() == seq_k.data_ptr() and not pool_k.is_contiguous()
        n_blocks = 6
    else:
        n_blocks, bs = case["pool"]
        pool_k = torch.randn(n_blocks, hkv, bs, d, generator=gen).to(dtype).to(device)
        pool_v = torch.randn(n_blocks, hkv, bs, d, generator=gen).to(dtype).to(device)
        kwargs["pool_lens"] = torch.randint(1, bs + 1, (n_blocks,), generator=gen).to(device)
    n_chunks, n_sel = case["ids"]
    heads = hkv if case.get("per_head") else 1
    ids = torch.stack([torch.randperm(n_blocks, generator=gen)[:n_sel] for _ in range(b * heads * n_chunks)]).view(
        b, heads, n_chunks, n_sel
    )
    ids[..., -1] = -1 if n_sel > 1 else ids[..., -1]  # an empty slot in every row
    if case.get("empty"):
        ids.fill_(-1)
    if "chunk" in case:
        kwargs["chunk_size"] = case["chunk"]
    if case.get("q_mem"):
        kwargs["q_mem"] = torch.randn(q.shape, generator=gen).to(dtype).to(device)
    return q, k, v, pool_k, pool_v, ids.to(device), kwargs


def run_memory_case(case: dict, device: str) -> dict:
    from memllm_kernels.reference import memory_attention, pattern_attention
    from memllm_kernels.triton_memory import triton_memory_attention

    q, k, v, pool_k, pool_v, ids, kwargs = memory_inputs(case, device)
    mass = case.get("mass", False)
    cpu_kwargs = {key: (val.cpu() if isinstance(val, torch.Tensor) else val) for key, val in kwargs.items()}
    want = memory_attention(
        q.cpu(), k.cpu(), v.cpu(), pool_k.cpu(), pool_v.cpu(), ids.cpu(), return_key_mass=mass, **cpu_kwargs
    )
    got = triton_memory_attention(q, k, v, pool_k, pool_v, ids, return_key_mass=mass, **kwargs)
    errors = {
        "out": _compare("out", got.out, want.out, OUT_TOL[case["dtype"]]),
        "lse": _compare("lse", got.lse, want.lse, LSE_TOL),
        "key_mass": _compare("key_mass", got.key_mass, want.key_mass, MASS_TOL),
        "memory_mass": _compare("memory_mass", got.memory_mass, want.memory_mass, MASS_TOL),
    }
    if case.get("empty"):  # no memory at all: exactly the local pattern
        local = pattern_attention(q.cpu(), k.cpu(), v.cpu(), case["local"])
        errors["vs_local"] = _compare("vs_local", got.out, local.out, OUT_TOL[case["dtype"]])
    return errors


def run_case(name: str, device: str) -> dict:
    for case in ATTENTION_CASES:
        if case["name"] == name:
            return run_attention_case(case, device)
    for case in MEMORY_CASES:
        if case["name"] == name:
            return run_memory_case(case, device)
    raise KeyError(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import triton  # noqa: F401  (after the caller set TRITON_INTERPRET)

    from memllm_kernels.triton_common import interpreting

    report = {"interpreting": interpreting(), "cases": {}}
    for name in CASE_NAMES:
        t0 = time.perf_counter()
        try:
            errors = run_case(name, args.device)
            report["cases"][name] = {"ok": True, "errors": errors}
        except Exception as exc:  # recorded per case; the test reports it
            report["cases"][name] = {"ok": False, "message": f"{exc!r}\n{traceback.format_exc()}"}
        report["cases"][name]["seconds"] = round(time.perf_counter() - t0, 2)
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

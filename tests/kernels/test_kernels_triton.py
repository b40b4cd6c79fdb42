"""The Triton kernels against the reference: under the CPU interpreter always, on CUDA when present.

The interpreter run happens in a subprocess with TRITON_INTERPRET=1 in its environment before
triton is imported (triton decides interpreted vs compiled when a kernel is defined, so a process
that already defined our kernels compiled cannot switch). One subprocess runs every case of
kernels_triton_cases.py and reports per case; each case is its own test here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernels_triton_cases import ATTENTION_CASES, CASE_NAMES, MEMORY_CASES, run_case

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HAS_TRITON = importlib.util.find_spec("triton") is not None


@pytest.fixture(scope="module")
def interpreter_report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    if not HAS_TRITON:
        pytest.skip("triton is not installed (it is in the dev extra): interpreter tests cannot run")
    out = tmp_path_factory.mktemp("triton") / "report.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{ROOT / 'kernels'}{os.pathsep}{ROOT}"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "kernels_triton_cases.py"), "--device", "cpu", "--out", str(out)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, f"interpreter run crashed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    assert report["interpreting"], "the subprocess did not run the kernels in the interpreter"
    return report


@pytest.mark.parametrize("name", CASE_NAMES)
def test_triton_interpreter_matches_reference(interpreter_report: dict, name: str) -> None:
    result = interpreter_report["cases"][name]
    assert result["ok"], result.get("message")
    assert set(result["errors"]) >= {"out", "lse", "key_mass"}


def test_interpreter_covers_dtypes_head_dims_and_patterns() -> None:
    """The case list itself: both dtypes, head_dim 64 and 128, GQA, ragged tiles, every pattern kind."""
    cases = ATTENTION_CASES + MEMORY_CASES
    assert {c["dtype"] for c in cases} == {torch.float16, torch.bfloat16}
    assert {64, 128} <= {c["shape"][5] for c in cases}
    assert any(c["shape"][1] != c["shape"][2] for c in cases), "no GQA case"
    assert any(c["shape"][3] % 16 and c["shape"][4] % 16 for c in cases), "no ragged case"
    assert any(c["shape"][3] < c["shape"][4] for c in cases), "no chunked-prefill case"
    kinds = {c["pattern"].kind for c in ATTENTION_CASES}
    assert kinds == {"full", "window", "strided", "fixed"}
    assert any(c["pattern"].n_random for c in ATTENTION_CASES) and any(c["pattern"].n_global for c in ATTENTION_CASES)


CUDA = torch.cuda.is_available() and HAS_TRITON
NO_CUDA = "no CUDA device here: the compiled Triton kernels are checked only under the interpreter"


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_triton_cuda_matches_reference(name: str) -> None:
    errors = run_case(name, "cuda")
    assert errors["out"] >= 0


@pytest.mark.skipif(not CUDA, reason=NO_CUDA)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_triton_cuda_large_tiles(dtype: torch.dtype, head_dim: int) -> None:
    """GPU tiles (128 x 64) at a length with ragged tiles, every pattern kind."""
    from memllm_kernels import patterns as P
    from memllm_kernels.reference import pattern_attention
    from memllm_kernels.triton_block_sparse import triton_attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 1000, head_dim, generator=gen).to(dtype).cuda()
    k = torch.randn(1, 2, 1100, head_dim, generator=gen).to(dtype).cuda()
    v = torch.randn(1, 2, 1100, head_dim, generator=gen).to(dtype).cuda()
    tol = 4e-3 if dtype == torch.float16 else 3e-2
    for pat in (P.full(), P.sliding_window(256), P.bigbird(128, 64, 2), P.strided(100), P.fixed(128, 16)):
        want = pattern_attention(q, k, v, pat, return_key_mass=True)
        got = triton_attention(q, k, v, pat, return_key_mass=True)
        torch.testing.assert_close(got.out.float(), want.out.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(got.lse, want.lse, atol=1e-3, rtol=1e-3)
        torch.testing.assert_close(got.key_mass, want.key_mass, atol=1e-3, rtol=1e-3)


def test_bench_gpu_cpu_smoke(tmp_path: Path) -> None:
    """`python -m memllm_kernels.bench_gpu --cpu-smoke` runs end to end (interpreter) and its checks pass."""
    if not HAS_TRITON:
        pytest.skip("triton is not installed (it is in the dev extra)")
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'kernels'}{os.pathsep}{ROOT}"}
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "memllm_kernels.bench_gpu", "--cpu-smoke", "--json", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["checks"] and all(c["ok"] for c in report["checks"])
    kernels_timed = {r["kernel"] for r in report["timings"]}
    assert len(kernels_timed) == 8 and all(r["ms"] > 0 for r in report["timings"])
    assert "| tokens | kernel" in proc.stdout

"""Backend choice: argument > use_backend() > MEMLLM_KERNEL_BACKEND > auto; logged once; never silent."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import memllm_kernels
from memllm_kernels import dispatch
from memllm_kernels import patterns as P
from memllm_kernels.reference import memory_attention as ref_memory
from memllm_kernels.reference import pattern_attention

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fresh_env_cache():
    dispatch.env_backend.cache_clear()
    yield
    dispatch.env_backend.cache_clear()


def _qkv(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, h, 40, 16, generator=g).to(dtype) for h in (4, 2, 2))


def test_auto_on_cpu_is_blocked_and_logged_once(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    monkeypatch.delenv(dispatch.ENV_VAR, raising=False)
    monkeypatch.setattr(dispatch, "_logged", set())
    q, k, v = _qkv()
    with caplog.at_level(logging.INFO, logger="memllm_kernels"):
        for _ in range(3):
            assert dispatch.choose_backend(q) == "blocked"
            memllm_kernels.attention(q, k, v, P.sliding_window(8))
    msgs = [r.getMessage() for r in caplog.records if r.name == "memllm_kernels"]
    assert msgs == ["memllm_kernels.attention: using the blocked backend (auto: cpu tensors)"]


def test_precedence_argument_context_env(monkeypatch) -> None:
    q, _, _ = _qkv()
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.choose_backend(q) == "reference"
    with memllm_kernels.use_backend("blocked"):
        assert dispatch.choose_backend(q) == "blocked"
        with memllm_kernels.use_backend("reference"):
            assert dispatch.choose_backend(q) == "reference"
        assert dispatch.choose_backend(q) == "blocked"
        assert dispatch.choose_backend(q, backend="reference") == "reference"
    assert dispatch.choose_backend(q) == "reference"


def test_env_is_read_once(monkeypatch) -> None:
    q, _, _ = _qkv()
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    assert dispatch.choose_backend(q) == "reference"
    monkeypatch.setenv(dispatch.ENV_VAR, "blocked")
    assert dispatch.choose_backend(q) == "reference", "the variable is read once per process"
    dispatch.env_backend.cache_clear()
    assert dispatch.choose_backend(q) == "blocked"
    monkeypatch.setenv(dispatch.ENV_VAR, "auto")
    dispatch.env_backend.cache_clear()
    assert dispatch.choose_backend(q) == "blocked"


def test_bad_names_raise(monkeypatch) -> None:
    q, _, _ = _qkv()
    with pytest.raises(ValueError, match="unknown kernel backend"):
        dispatch.choose_backend(q, backend="cuda")
    with pytest.raises(ValueError), memllm_kernels.use_backend("fast"):
        pass
    monkeypatch.setenv(dispatch.ENV_VAR, "nope")
    with pytest.raises(ValueError, match=dispatch.ENV_VAR):
        dispatch.choose_backend(q)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "0", reason="this process runs Triton interpreted")
def test_triton_requested_on_cpu_raises_instead_of_falling_back() -> None:
    q, k, v = _qkv(torch.float16)
    with pytest.raises(RuntimeError, match="cannot serve"):
        memllm_kernels.attention(q, k, v, backend="triton")
    with memllm_kernels.use_backend("triton"), pytest.raises(RuntimeError, match="cannot serve"):
        memllm_kernels.attention(q, k, v)


@pytest.mark.parametrize("backend", ["reference", "blocked"])
def test_entries_match_reference(backend: str) -> None:
    q, k, v = _qkv()
    pat = P.bigbird(8, 2, 1, random_block=8)
    got = memllm_kernels.attention(q, k, v, pat, return_key_mass=True, backend=backend)
    want = pattern_attention(q, k, v, pat, return_key_mass=True)
    torch.testing.assert_close(got.out, want.out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got.key_mass, want.key_mass, atol=2e-5, rtol=2e-5)
    g = torch.Generator().manual_seed(1)
    pool_k, pool_v = torch.randn(5, 2, 8, 16, generator=g), torch.randn(5, 2, 8, 16, generator=g)
    ids = torch.tensor([[[0, 3], [4, -1]]])  # (B=1, n_chunks=2, n_sel=2): chunks of 20 rows
    got_m = memllm_kernels.memory_attention(q, k, v, pool_k, pool_v, ids, local=P.sinks_window(2, 8), backend=backend)
    want_m = ref_memory(q, k, v, pool_k, pool_v, ids, local=P.sinks_window(2, 8))
    torch.testing.assert_close(got_m.out, want_m.out, atol=2e-5, rtol=2e-5)
    assert not torch.allclose(got_m.out, pattern_attention(q, k, v, P.sinks_window(2, 8)).out)


def test_imports_without_triton_and_never_imports_it_on_cpu() -> None:
    """A machine without triton: the kernel modules import, say why they cannot serve, CPU works."""
    script = textwrap.dedent(
        """
        import sys, importlib.abc
        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name == "triton" or name.startswith("triton."):
                    raise ImportError("no triton here")
        sys.meta_path.insert(0, Block())
        import torch, memllm_kernels
        q = torch.randn(1, 2, 20, 16)
        out = memllm_kernels.attention(q, q[:, :1], q[:, :1], memllm_kernels.sliding_window(4))
        assert "triton" not in sys.modules, "the CPU path must not import triton"
        import memllm_kernels.triton_block_sparse as tbs, memllm_kernels.triton_memory, memllm_kernels.triton_key_mass
        from memllm_kernels.triton_common import HAS_TRITON
        assert not HAS_TRITON
        try:
            memllm_kernels.attention(q.half(), q[:, :1].half(), q[:, :1].half(), backend="triton")
        except RuntimeError as exc:
            assert "triton is not installed" in str(exc), exc
        else:
            raise AssertionError("triton backend must refuse without triton")
        print("OK")
        """
    )
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'kernels'}{os.pathsep}{ROOT}"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "OK", proc.stderr[-3000:]

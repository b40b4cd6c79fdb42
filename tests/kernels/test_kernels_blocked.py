"""The block-sparse torch path against the reference over many shapes, dtypes and tile sizes."""

from __future__ import annotations

import pytest
import torch

from memllm_kernels import patterns as P
from memllm_kernels.cpu_blocked import blocked_attention, blocked_memory_attention
from memllm_kernels.layouts import build_layout
from memllm_kernels.reference import memory_attention, pattern_attention

PATTERNS = [
    P.full(),
    P.sliding_window(1),
    P.sliding_window(13),
    P.sinks_window(4, 16),
    P.longformer(9, 20),
    P.bigbird(16, 4, 2, random_block=8, seed=1),
    P.bigbird(12, 0, 3, random_block=5, seed=2),
    P.strided(7),
    P.strided(16),
    P.fixed(16, 4),
    P.fixed(10, 3),
    P.Pattern("fixed", stride=12, summary=2, n_global=5, n_random=1, random_block=6),
]
# (B, Hq, Hkv, Tq, Tk, D): GQA, MHA, single head, ragged tiles, chunked prefill, decode
SHAPES = [
    (1, 4, 2, 50, 50, 16),
    (2, 3, 1, 64, 64, 32),
    (1, 2, 2, 17, 45, 8),
    (1, 6, 3, 1, 77, 16),
    (2, 2, 1, 100, 129, 16),
]
# float32 must agree to float32 rounding; 16-bit outputs differ by the final rounding only
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 2e-3}


def _inputs(shape, dtype, seed=0):
    b, hq, hkv, tq, tk, d = shape
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return mk(b, hq, tq, d), mk(b, hkv, tk, d), mk(b, hkv, tk, d)


def _close(got, want, tol, what):
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("block", [16, 24])
def test_blocked_matches_reference_float32(pattern: P.Pattern, shape: tuple, block: int) -> None:
    q, k, v = _inputs(shape, torch.float32)
    want = pattern_attention(q, k, v, pattern, return_key_mass=True)
    got = blocked_attention(q, k, v, pattern, return_key_mass=True, block_size=block)
    _close(got.out, want.out, TOL[torch.float32], "out")
    _close(got.lse, want.lse, 1e-5, "lse")
    _close(got.key_mass, want.key_mass, 1e-5, "key_mass")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", PATTERNS[::3], ids=lambda p: p.name)
def test_blocked_matches_reference_16bit(dtype: torch.dtype, pattern: P.Pattern) -> None:
    q, k, v = _inputs((1, 4, 2, 70, 90, 32), dtype, seed=3)
    want = pattern_attention(q, k, v, pattern)
    got = blocked_attention(q, k, v, pattern, block_size=32)
    assert got.out.dtype == dtype and got.lse.dtype == torch.float32
    _close(got.out, want.out, TOL[dtype], "out")
    _close(got.lse, want.lse, 1e-4, "lse")


def test_blocked_default_tiles_long_window() -> None:
    """Default 128-token tiles, a window that is not a multiple of them, a length that is not either."""
    q, k, v = _inputs((1, 2, 1, 700, 700, 16), torch.float32, seed=4)
    for pat in (P.sliding_window(200), P.bigbird(200, 32, 2), P.strided(96)):
        want = pattern_attention(q, k, v, pat, return_key_mass=True)
        got = blocked_attention(q, k, v, pat, return_key_mass=True)
        _close(got.out, want.out, 2e-5, pat.name)
        _close(got.key_mass, want.key_mass, 1e-4, pat.name)


def _memory_inputs(dtype, per_head, seed=0, n_chunks=3, chunk=8, pool_view=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = _inputs((2, 4, 2, 24, 50, 16), dtype, seed)
    if pool_view:  # another sequence's keys seen as blocks of 8 (a strided view, no copy)
        seq_k, seq_v = (
            torch.randn(2, 56, 16, generator=g).to(dtype),
            torch.randn(2, 56, 16, generator=g).to(dtype),
        )
        pool_k, pool_v = (
            seq_k.unflatten(1, (7, 8)).transpose(0, 1),
            seq_v.unflatten(1, (7, 8)).transpose(0, 1),
        )
        lens = None
    else:
        pool_k = torch.randn(7, 2, 8, 16, generator=g).to(dtype)
        pool_v = torch.randn(7, 2, 8, 16, generator=g).to(dtype)
        lens = torch.tensor([8, 3, 8, 1, 5, 8, 2])
    heads = 2 if per_head else 1
    ids = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(2 * heads * n_chunks)])
    ids = ids.view(2, heads, n_chunks, 3)
    ids[0, :, -1, 2] = -1
    q_mem = torch.randn(q.shape, generator=g).to(dtype)
    return q, k, v, pool_k, pool_v, ids, dict(pool_lens=lens, chunk_size=chunk, q_mem=q_mem)


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("block", [8, 16, 20])  # tiles inside, equal to and straddling the 8-row chunks
@pytest.mark.parametrize("local", [P.sinks_window(3, 10), P.sliding_window(4), P.full()], ids=lambda p: p.name)
def test_blocked_memory_matches_reference(per_head: bool, block: int, local: P.Pattern) -> None:
    q, k, v, pool_k, pool_v, ids, kw = _memory_inputs(torch.float32, per_head)
    want = memory_attention(q, k, v, pool_k, pool_v, ids, local=local, return_key_mass=True, **kw)
    got = blocked_memory_attention(
        q, k, v, pool_k, pool_v, ids, local=local, return_key_mass=True, block_size=block, **kw
    )
    for name in ("out", "lse", "key_mass", "memory_mass"):
        _close(getattr(got, name), getattr(want, name), 2e-5, name)


def test_blocked_memory_pool_view_and_bf16() -> None:
    q, k, v, pool_k, pool_v, ids, kw = _memory_inputs(torch.bfloat16, True, seed=5, pool_view=True)
    assert not pool_k.is_contiguous()
    local = P.sinks_window(2, 12)
    want = memory_attention(q, k, v, pool_k, pool_v, ids, local=local, **kw)
    got = blocked_memory_attention(q, k, v, pool_k, pool_v, ids, local=local, block_size=16, **kw)
    _close(got.out, want.out, TOL[torch.bfloat16], "out")
    _close(got.lse, want.lse, 1e-4, "lse")


@pytest.mark.parametrize("pattern", [P.sliding_window(512), P.sinks_window(64, 512), P.bigbird(512, 64, 3)])
def test_block_sparse_work_grows_linearly(pattern: P.Pattern) -> None:
    """Bounded patterns visit a bounded number of key tiles per query tile: work linear in length."""
    layouts = [build_layout(pattern, t, t, 128, 128) for t in (4096, 8192, 16384)]
    per_row = [int(lay.kv_count.max()) for lay in layouts]
    assert per_row[0] == per_row[1] == per_row[2] <= (pattern.window // 128 + 2) + 1 + 2 * pattern.n_random
    pairs = [lay.tile_pairs() for lay in layouts]
    assert pairs[2] < 2.4 * pairs[1] < 2.4**2 * pairs[0], pairs
    dense = [build_layout(P.full(), t, t, 128, 128).tile_pairs() for t in (8192, 16384)]
    assert dense[1] > 3.9 * dense[0], "causal full attention is quadratic"

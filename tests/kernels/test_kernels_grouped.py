"""memllm_kernels.grouped (the engine's dense CPU hot path) against the reference it promises to match."""

from __future__ import annotations

import pytest
import torch

from memllm_kernels.grouped import (
    FEW_QUERIES,
    causal_attention_with_lse,
    causal_attention_with_sampled_mass,
    decode_attention_with_lse,
    few_query_scores,
    grouped_attention_with_lse,
    key_mass_from_lse,
    keys_attention_with_lse,
)
from memllm_kernels.reference import attention_with_lse


def _inputs(seed: int, tq: int, tk: int, dtype: torch.dtype):
    """(generator, q (2, 6, tq, 32), k and v (2, 2, tk, 32)): the generator goes on to draw masks."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, h, t, 32, generator=g).to(dtype) for h, t in ((6, tq), (2, tk), (2, tk)))
    return g, q, k, v


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "causal", "per_key"])
def test_grouped_matches_reference(dtype: torch.dtype, mask_kind: str) -> None:
    g, q, k, v = _inputs(0, 9, 30, dtype)
    mask = None
    if mask_kind == "causal":
        mask = torch.arange(30)[None, :] <= torch.arange(21, 30)[:, None]  # (Tq, Tk)
    elif mask_kind == "per_key":
        mask = torch.rand(2, 1, 1, 30, generator=g) > 0.3  # (B, 1, 1, Tk)
    got = grouped_attention_with_lse(q, k, v, mask, return_key_mass=True)
    want = attention_with_lse(q, k, v, mask, return_key_mass=True)
    tol = 1e-5 if dtype == torch.float32 else 3e-2  # bfloat16 products in the grouped path
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got[1], want[1], atol=tol * 10, rtol=tol)
    torch.testing.assert_close(got[2], want[2], atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("tq", [1, 9, 30])
def test_grouped_causal_shortcut_is_bottom_right_causal(tq: int) -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, tq, 16, generator=g)
    k, v = torch.randn(1, 2, 30, 16, generator=g), torch.randn(1, 2, 30, 16, generator=g)
    mask = torch.arange(30)[None, :] <= torch.arange(30 - tq, 30)[:, None]
    got = grouped_attention_with_lse(q, k, v, causal=True, return_key_mass=True)
    want = attention_with_lse(q, k, v, mask, return_key_mass=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tk", [1, 7, 300])
def test_decode_path_matches_reference(dtype: torch.dtype, tk: int) -> None:
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 1, 32, generator=g).to(dtype)
    k = torch.randn(2, 2, tk, 32, generator=g).to(dtype)
    v = torch.randn(2, 2, tk, 32, generator=g).to(dtype)
    got = decode_attention_with_lse(q, k, v, 32**-0.5, return_key_mass=True)
    want = attention_with_lse(q, k, v, None, return_key_mass=True)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got[0].float(), want[0].float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got[1], want[1], atol=tol * 10, rtol=tol)
    torch.testing.assert_close(got[2], want[2], atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_few_query_scores_on_a_slice_of_a_key_buffer(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    buffer = torch.randn(4, 3, 50, 16, generator=g).to(dtype)  # (rows, Hkv, slots, D)
    keys = buffer[:, :, :37]  # the first 37 slots: not contiguous
    q = torch.randn(4, 3, 2, 16, generator=g).to(dtype)
    got = few_query_scores(q, keys)
    want = torch.einsum("rhgd,rhkd->rhgk", q.double(), keys.double())
    assert got.dtype == torch.float32 and got.is_contiguous() and got.shape == (4, 3, 2, 37)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "all_valid", "per_key", "a_row_without_keys"])
@pytest.mark.parametrize("tq", [7, 1])  # 1: a decode step (the grouped matmuls in bfloat16)
def test_keys_attention_matches_reference(dtype: torch.dtype, mask_kind: str, tq: int) -> None:
    g, q, k, v = _inputs(5, tq, 40, dtype)
    mask = None
    if mask_kind != "none":
        mask = torch.rand(2, 1, 1, 40, generator=g) > 0.3  # (B, 1, 1, Tk)
    if mask_kind == "all_valid":  # whole blocks only: the kernel runs without a mask
        mask = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    if mask_kind == "a_row_without_keys":  # the grouped path's answer: zeros and lse -inf
        mask[1] = False
    got_out, got_lse = keys_attention_with_lse(q, k, v, mask, 0.2)
    want_out, want_lse, _ = attention_with_lse(q, k, v, mask, 0.2)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got_out.float(), want_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(got_lse, want_lse.float(), atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("tq", "tk"), [(9, 30), (30, 30), (1, 30), (5, 5), (FEW_QUERIES + 8, 90), (FEW_QUERIES + 8, FEW_QUERIES + 8)]
)
def test_causal_attention_matches_reference(dtype: torch.dtype, tq: int, tk: int) -> None:
    """Exact causal attention (queries = the last tq positions) on the flash path (float32,
    bfloat16) and the grouped fallback (float16)."""
    _, q, k, v = _inputs(5, tq, tk, dtype)
    causal = torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None]  # (Tq, Tk)
    out, lse = causal_attention_with_lse(q, k, v, 0.2)
    want_out, want_lse, _ = attention_with_lse(q.float(), k.float(), v.float(), causal, 0.2)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.float(), want_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse, atol=tol * 10, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tq", "tk"), [(9, 30), (30, 30), (1, 30), (5, 5), (FEW_QUERIES + 8, 90)])
@pytest.mark.parametrize("stride", [1, 4])
def test_causal_attention_with_sampled_mass(dtype: torch.dtype, tq: int, tk: int, stride: int) -> None:
    """Out and lse are exact causal attention (queries = the last tq positions); the key mass is
    the reference mass of the sampled queries (the last, then every stride-th before it), scaled."""
    _, q, k, v = _inputs(7, tq, tk, dtype)
    causal = torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None]  # (Tq, Tk)
    out, lse, mass = causal_attention_with_sampled_mass(q, k, v, 0.2, stride)
    want_out, want_lse, _ = attention_with_lse(q, k, v, causal, 0.2)
    picked = torch.arange(tq - 1, -1, -stride).flip(0)
    _, _, want_mass = attention_with_lse(q[:, :, picked], k, v, causal[picked], 0.2, return_key_mass=True)
    want_mass = want_mass * (tq / picked.numel())
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert out.dtype == dtype and lse.dtype == torch.float32 and mass.shape == (2, 2, tk)
    torch.testing.assert_close(out.float(), want_out.float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, want_lse.float(), atol=tol * 10, rtol=tol)
    torch.testing.assert_close(mass, want_mass.float(), atol=tol * 10, rtol=tol)
    # each sampled query spreads one unit of mass per query head: the total is Tq * Hq / Hkv per kv head
    torch.testing.assert_close(mass.sum(-1), torch.full((2, 2), tq * 3.0), atol=1e-3 * tq, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tq", [7, 1])
def test_key_mass_from_lse_is_the_attention_each_key_drew(dtype: torch.dtype, tq: int) -> None:
    """The mass recovered from the fast kernel's lse equals the reference attention's key mass,
    hidden keys drawing none."""
    g, q, k, v = _inputs(9, tq, 40, dtype)
    mask = torch.rand(2, 1, 1, 40, generator=g) > 0.3  # (B, 1, 1, Tk) True = valid key
    _, lse = keys_attention_with_lse(q, k, v, mask, 0.2)
    mass = key_mass_from_lse(q, k, lse, 0.2, hidden=~mask)
    _, _, want = attention_with_lse(q.float(), k.float(), v.float(), mask, 0.2, return_key_mass=True)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert mass.shape == (2, 2, 40) and mass.dtype == torch.float32
    torch.testing.assert_close(mass, want.float(), atol=tol * 10, rtol=tol)
    assert mass.masked_select(~mask.view(2, 1, 40)).abs().max() == 0

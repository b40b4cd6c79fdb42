"""The engine's grouped CPU attention against the reference (the spec)."""

from __future__ import annotations

import pytest
import torch

from memllm_kernels.grouped import grouped_attention_with_lse
from memllm_kernels.reference import attention_with_lse


@pytest.mark.parametrize(("hq", "hkv", "tq", "tk"), [(4, 2, 1, 37), (6, 2, 7, 50), (3, 3, 5, 5), (9, 3, 16, 130)])
@pytest.mark.parametrize("masking", ["none", "causal", "padding"])
def test_grouped_matches_reference(hq, hkv, tq, tk, masking):
    g = torch.Generator().manual_seed(hq * 100 + tk)
    q = torch.randn(2, hq, tq, 16, generator=g)
    k = torch.randn(2, hkv, tk, 16, generator=g)
    v = torch.randn(2, hkv, tk, 16, generator=g)
    mask, kwargs = None, {}
    if masking == "causal":
        mask = torch.arange(tk).unsqueeze(0) <= torch.arange(tk - tq, tk).unsqueeze(1)
        kwargs = {"causal": True}
    elif masking == "padding":
        mask = torch.rand(2, 1, 1, tk, generator=g) > 0.3
        mask[1] = False  # a batch row that sees no key at all
        kwargs = {"mask": mask}
    ref_out, ref_lse, ref_mass = attention_with_lse(q, k, v, mask, return_key_mass=True)
    out, lse, mass = grouped_attention_with_lse(q, k, v, return_key_mass=True, **kwargs)
    assert torch.allclose(out, ref_out, atol=1e-5)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert torch.allclose(lse[finite], ref_lse[finite], atol=1e-5)
    assert torch.allclose(mass, ref_mass, atol=1e-4)

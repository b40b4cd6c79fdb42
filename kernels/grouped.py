"""Dense attention for the engine's hot path on CPU, grouped-query heads without copying keys.

Same contract as :func:`kernels.reference.attention_with_lse` (the spec it is tested against) but
the query heads of a group are folded into the row dimension, so each kv head is multiplied once
instead of being repeated ``Hq/Hkv`` times, and the matrix products run in the input dtype
(bfloat16 products are ~3x faster on CPUs with AVX512-BF16); softmax and log-sum-exp are float32.

Shapes: q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D); mask bool broadcastable to (Tq, Tk) or
(B, 1, 1, Tk) style (anything broadcastable to (B, 1, Tq, Tk)), True = may attend.
"""

from __future__ import annotations

import math

import torch


def grouped_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_key_mass: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Returns (out (B, Hq, Tq, D) in q's dtype, lse (B, Hq, Tq) float32, key_mass (B, Hkv, Tk) or None)."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    qg = q.reshape(b, hkv, g * tq, d)  # (B, Hkv, G*Tq, D): head h = kv*G + g
    scores = torch.matmul(qg, k.transpose(-1, -2)).float().mul_(scale).view(b, hkv, g, tq, tk)
    if mask is not None:
        m = mask
        while m.dim() < 4:
            m = m.unsqueeze(0)
        scores.masked_fill_(~m.unsqueeze(2) if m.shape[1] == 1 else ~m.view(b, hkv, g, tq, tk), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hkv, G, Tq)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = scores.sub_(safe.unsqueeze(-1)).exp_()  # rows with no visible key are all 0
    out = torch.matmul(probs.view(b, hkv, g * tq, tk).to(v.dtype), v)  # (B, Hkv, G*Tq, D)
    key_mass = probs.sum(dim=(2, 3)) if return_key_mass else None  # (B, Hkv, Tk)
    return out.view(b, hq, tq, d).to(q.dtype), lse.view(b, hq, tq), key_mass

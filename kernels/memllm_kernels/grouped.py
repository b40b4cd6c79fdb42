"""Dense attention for the engine's hot path on CPU, grouped-query heads without copying keys.

Same contract as :func:`memllm_kernels.reference.attention_with_lse` (the spec it is tested against) plus a
``causal`` shortcut, but: the query heads of a group are folded into the row dimension, so each kv
head is multiplied once instead of being repeated ``Hq/Hkv`` times; the products run in the input
dtype (bfloat16 products are fast on CPUs with AVX512-BF16); the score tensor is touched by only
four elementwise passes (max, subtract, exp, sum) and normalisation is applied to the (small)
output instead of the (large) probability matrix.

Shapes: q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D); mask bool broadcastable to (B, 1, Tq, Tk),
True = may attend. ``causal=True`` means the queries are the last Tq of the Tk keys' positions
(key j visible to query i iff j <= Tk - Tq + i); only the trailing (Tq, Tq) block is masked.
"""

from __future__ import annotations

import functools
import math

import torch

from memllm_kernels.reference import merge_attention


def grouped_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_key_mass: bool = False,
    causal: bool = False,
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
    if causal and tq > 1:
        future = torch.ones(tq, tq, dtype=torch.bool).triu_(1)  # (Tq, Tq) True above the diagonal
        scores[..., tk - tq :].masked_fill_(future, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)  # (B, Hkv, G, Tq, 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    weights = scores.sub_(row_max).exp_()  # unnormalised probabilities; rows with no key are all 0
    denom = weights.sum(dim=-1, keepdim=True)  # (B, Hkv, G, Tq, 1)
    lse = (row_max + denom.log()).squeeze(-1)  # -inf where no key is visible
    inv = torch.where(denom > 0, 1.0 / denom, torch.zeros_like(denom))  # (B, Hkv, G, Tq, 1)
    out = torch.matmul(weights.view(b, hkv, g * tq, tk).to(v.dtype), v)  # (B, Hkv, G*Tq, D)
    out = (out.view(b, hkv, g, tq, d).float() * inv).view(b, hq, tq, d).to(q.dtype)
    key_mass = None
    if return_key_mass:  # sum over queries of normalised probabilities: a (1, G*Tq) x (G*Tq, Tk) product
        key_mass = torch.matmul(inv.view(b, hkv, 1, g * tq), weights.view(b, hkv, g * tq, tk)).squeeze(2)
    return out, lse.reshape(b, hq, tq), key_mass


# torch's fused CPU flash attention: (out, logsumexp) in one pass, without a score matrix in memory
_FLASH_CPU = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FLASH_DTYPES = (torch.float32, torch.bfloat16)


def keys_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every query over every valid key (no causal order, no key mass): (out (B, Hq, Tq, D) in q's
    dtype, lse (B, Hq, Tq) float32), as :func:`grouped_attention_with_lse` returns them.

    ``key_mask``: bool (B or 1, 1, 1, Tk), True = valid key, or None. This is the retrieved-memory
    part of a layer. On CPU, in float32 or bfloat16, it runs torch's fused flash-attention kernel
    with the query heads of a group folded into rows (valid because no query sees a different key
    set): 3x faster than the grouped path for 25 queries over 4,096 keys and 10x for 512 (ad-hoc
    timings on 2026-11-29, bfloat16, 2 threads). Otherwise, and when some batch row has no valid
    key, the grouped path.
    """
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    every_row_has_a_key = key_mask is None or bool(key_mask.any(-1).all())
    if tq == 1 and q.dtype == torch.bfloat16 and k.dtype == v.dtype == q.dtype and every_row_has_a_key:
        # a decode step: the grouped matmuls beat the flash kernel in bfloat16 (0.27 against 0.43 ms
        # per layer for 4,096 keys, 30 layers' keys cycling; warm caches: 0.22 against 0.29 ms); in
        # float32 flash wins (warm caches: 0.22 against 0.31 ms). Ad-hoc timings, 2026-11-30, 2 threads
        out, lse, _ = decode_attention_with_lse(q, k, v, scale, key_mask=key_mask)
        return out, lse
    fits = _FLASH_CPU is not None and q.device.type == "cpu" and q.dtype in _FLASH_DTYPES
    if not fits or k.dtype != q.dtype or v.dtype != q.dtype or not every_row_has_a_key:
        out, lse, _ = grouped_attention_with_lse(q, k, v, key_mask, scale)
        return out, lse
    bias = None
    if key_mask is not None and not bool(key_mask.all()):  # no mask: the kernel's fast path (13% on 4,096 keys)
        bias = torch.zeros(key_mask.shape, dtype=q.dtype).masked_fill_(~key_mask, float("-inf"))
    g = hq // hkv
    out, lse = _FLASH_CPU(q.reshape(b, hkv, g * tq, d), k, v, 0.0, False, attn_mask=bias, scale=scale)
    return out.reshape(b, hq, tq, d), lse.reshape(b, hq, tq)


def few_query_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q (..., Tq, D) @ k (..., Tk, D)^T as a contiguous float32 (..., Tq, Tk), for a few queries.

    Computed as (k @ q^T)^T. When k is a slice of a longer key buffer (a decode step's keys), torch's
    CPU kernels take the left operand in place but gather a transposed slice first: for a decode
    step's 3 queries per kv head this is 2-4x faster than q @ k^T (ad-hoc timings, bfloat16,
    400-2000 keys). With hundreds of queries (prefill) q @ k^T is faster: use it there.
    """
    scores = torch.matmul(k, q.transpose(-1, -2)).transpose(-1, -2)  # (..., Tq, Tk), transposed in memory
    return torch.empty(scores.shape, dtype=torch.float32).copy_(scores)  # one pass: contiguous float32


def decode_attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    return_key_mass: bool = False,
    key_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """:func:`grouped_attention_with_lse` for one query token (decode).

    q (B, Hq, 1, D); k, v (B, Hkv, Tk, D) with Tk >= 1; key_mask None (every key visible) or bool
    (B or 1, 1, 1, Tk) with at least one True per row -> (out (B, Hq, 1, D) in q's dtype, lse
    (B, Hq, 1) float32, key_mass (B, Hkv, Tk) float32 or None). The same math in about a third of
    the operations: with one query and at least one visible key there is no empty row, and the
    probabilities are normalised through the log-sum-exp directly. A decode step calls this once
    per layer and stream, so its fixed cost, not its arithmetic, is what matters.
    """
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    scores = few_query_scores(q.view(b, hkv, g, d), k).mul_(scale)  # (B, Hkv, G, Tk)
    if key_mask is not None:
        scores.masked_fill_(~key_mask.reshape(key_mask.shape[0], 1, 1, -1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, Hkv, G, 1)
    probs = scores.sub_(lse).exp_()
    out = torch.matmul(probs.to(v.dtype), v)  # (B, Hkv, G, D)
    key_mass = probs.sum(dim=2) if return_key_mass else None
    return out.view(b, hq, 1, d), lse.view(b, hq, 1), key_mass


def causal_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of q, the last Tq of the Tk positions of k and v (Tq <= Tk):
    (out (B, Hq, Tq, D) in q's dtype, lse (B, Hq, Tq) float32), no key mass.

    On CPU in float32/bfloat16 it runs torch's fused flash kernel with the query heads of a group
    folded into rows. Up to ``FEW_QUERIES`` queries (a chat turn, a prompt's tail) in one call with
    an additive causal bias on the trailing (Tq, Tq) square. Longer chunks in two parts merged by
    log-sum-exp: the Tk-Tq earlier keys, which every query sees (no mask), and the causal square;
    one masked call would compute every (query, key) product of the square, half of them wasted: for
    4,096 queries over 8,192 keys the split takes ~1.08 s per layer against ~1.62 s (bfloat16, one
    thread, an ad-hoc timing on 2026-11-29). Elsewhere, the grouped path.
    """
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    fits = _FLASH_CPU is not None and q.device.type == "cpu" and q.dtype in _FLASH_DTYPES
    if not fits or k.dtype != q.dtype or v.dtype != q.dtype:
        out, lse, _ = grouped_attention_with_lse(q, k, v, None, scale, causal=True)
        return out, lse
    past = tk - tq
    if tq <= FEW_QUERIES:
        bias = _causal_bias(tq, tk, g, q.dtype)
        out, lse = _FLASH_CPU(q.reshape(b, hkv, g * tq, d), k, v, 0.0, False, attn_mask=bias, scale=scale)
        return out.reshape(b, hq, tq, d), lse.reshape(b, hq, tq).float()
    k_new = k[:, :, past:].repeat_interleave(g, dim=1)  # (B, Hq, Tq, D): Tq keys, cheap to repeat
    v_new = v[:, :, past:].repeat_interleave(g, dim=1)
    out_new, lse_new = _FLASH_CPU(q, k_new, v_new, 0.0, True, scale=scale)  # square: top-left = bottom-right
    if past == 0:
        return out_new, lse_new.float()
    out_past, lse_past = _FLASH_CPU(
        q.reshape(b, hkv, g * tq, d), k[:, :, :past], v[:, :, :past], 0.0, False, scale=scale
    )
    parts = [(out_past.reshape(b, hq, tq, d), lse_past.reshape(b, hq, tq).float()), (out_new, lse_new.float())]
    lse = torch.logaddexp(parts[0][1], parts[1][1])  # every row sees at least its own key: finite
    return merge_attention(parts), lse


@functools.lru_cache(maxsize=4)  # every layer of a forward asks for the same one
def _causal_bias(tq: int, tk: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal bias (groups*Tq, Tk) for the last Tq of Tk positions, the query heads of a
    group folded into rows (row g*Tq + i: query i, at position Tk - Tq + i). Read only."""
    bias = torch.zeros(tq, tk, dtype=dtype)
    bias[:, tk - tq :].masked_fill_(torch.ones(tq, tq, dtype=torch.bool).triu_(1), float("-inf"))
    return bias.repeat(groups, 1)


# Up to this many queries (a chat turn, the tail of a prefill) one flash call with a causal bias
# beats the two-part split: 0.44 against 0.59 ms per layer for 22 queries over 2,112 keys, 0.81
# against 0.86 for 64 (bfloat16, 2 threads, Intel Xeon with AMX, ad-hoc timings on 2026-12-07)
FEW_QUERIES = 64


def causal_attention_with_sampled_mass(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mass_stride: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A prefill chunk's local attention: :func:`causal_attention_with_lse` plus the key mass,
    estimated from every ``mass_stride``-th query.

    q (B, Hq, Tq, D) are the last Tq of the Tk positions of k, v (B, Hkv, Tk, D), Tq <= Tk ->
    (out (B, Hq, Tq, D) in q's dtype, lse (B, Hq, Tq) float32, key_mass (B, Hkv, Tk) float32).

    The key mass (the attention each key drew, summed over queries and the heads of its group)
    only ranks a block's keys to choose its representatives, so it is estimated from the queries
    Tq-1, Tq-1-stride, ... (the last one always included), scaled by Tq / (queries used); stride 1
    runs the grouped path instead, which yields the exact mass with out and lse. Out and lse are
    exact either way. The fused kernel plus the sampled mass beats the grouped path at every size
    measured: 512 queries over 2,624 keys ~35 against ~118 ms (2026-11-29), 22 queries over 2,112
    keys (a chat turn) 0.58 against 1.22 ms, 8 over 512 0.17 against 0.21 (bfloat16, 2 threads,
    Intel Xeon with AMX, ad-hoc timings on 2026-12-07).
    """
    if mass_stride <= 1:
        out, lse, mass = grouped_attention_with_lse(q, k, v, None, scale, return_key_mass=True, causal=True)
        assert mass is not None
        return out, lse, mass
    out, lse = causal_attention_with_lse(q, k, v, scale)
    return out, lse, _sampled_key_mass(q, k, lse, scale, mass_stride)


def sampled_queries(tq: int, stride: int) -> torch.Tensor:
    """The queries a key mass is estimated from: indices Tq-1, Tq-1-stride, ... ascending (S,)."""
    return torch.arange(tq - 1, -1, -stride).flip(0)


def _sampled_key_mass(q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, stride: int) -> torch.Tensor:
    """Key mass (B, Hkv, Tk) of causal attention (q the last Tq positions of k) from the queries
    Tq-1, Tq-1-stride, ..., scaled to the full Tq; lse (B, Hq, Tq) the rows' log-sum-exp."""
    tq, tk = q.shape[2], k.shape[2]
    picked = sampled_queries(tq, stride)
    mass = causal_key_mass(q[:, :, picked], k, lse[:, :, picked], picked + tk - tq, scale)
    return mass.mul_(tq / picked.numel())


def causal_key_mass(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, positions: torch.Tensor, scale: float
) -> torch.Tensor:
    """Key mass (B, Hkv, Tk) that queries q (B, Hq, S, D) at key positions ``positions`` (S,) drew
    in causal attention (query i sees keys 0..positions[i]), from their rows' log-sum-exp lse (B, Hq, S)."""
    future = torch.arange(k.shape[2]).unsqueeze(0) > positions.unsqueeze(1)  # (S, Tk)
    return key_mass_from_lse(q, k, lse, scale, hidden=future)


def key_mass_from_lse(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, scale: float, hidden: torch.Tensor | None = None
) -> torch.Tensor:
    """The attention each key drew, given the rows' log-sum-exp from the attention already computed.

    q (B, Hq, Tq, D), k (B, Hkv, Tk, D), lse (B, Hq, Tq) -> key mass (B, Hkv, Tk) float32: the
    probabilities exp(q.k * scale - lse) summed over the queries and the query heads of each kv
    head. ``hidden``: bool broadcastable to (Tq, Tk), or (B, 1, 1, Tk) as a key mask's negation,
    True where the key is not visible. Lets a caller keep the output of the fast kernel (which
    yields no mass) and still observe where the attention went, without changing the output.
    """
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    scores = torch.matmul(q.reshape(b, hkv, g * tq, d), k.transpose(-1, -2)).float().mul_(scale)
    scores = scores.view(b, hkv, g, tq, tk)
    if hidden is not None:
        scores.masked_fill_(hidden if hidden.dim() < 4 else hidden.unsqueeze(2), float("-inf"))
    probs = scores.sub_(lse.float().reshape(b, hkv, g, tq, 1)).exp_()
    return probs.sum(dim=(2, 3))

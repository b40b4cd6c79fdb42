"""Reference attention in plain torch: the spec every faster backend is tested against.

Shapes (all backends): q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) with Hq % Hkv == 0 (grouped-query
heads: query head h reads kv head h // (Hq // Hkv)). ``mask`` is boolean, True = may attend,
broadcastable to (B, Hq, Tq, Tk). Computation is in float32 whatever the input dtype; outputs are
cast back to q's dtype, the log-sum-exp stays float32.
"""

from __future__ import annotations

import math

import torch

from memllm_kernels.common import (
    AttentionOutput,
    MemoryAttentionOutput,
    check_pool,
    check_qkv,
    normalize_block_ids,
)
from memllm_kernels.patterns import Pattern, token_mask


def expand_kv(x: torch.Tensor, n_q_heads: int) -> torch.Tensor:
    """(B, Hkv, T, D) -> (B, Hq, T, D) by repeating each kv head for its query group."""
    groups = n_q_heads // x.shape[1]
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def attention_with_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    scale: float | None = None,
    return_key_mass: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Softmax attention over one key set, returning what is needed to merge it with others.

    Returns (out (B, Hq, Tq, D), lse (B, Hq, Tq) float32, key_mass (B, Hkv, Tk) float32 or None).
    A query row with no visible key gets out = 0 and lse = -inf (it then contributes nothing to a
    merge). key_mass is the attention probability each key received, summed over queries and over
    the query heads of its group (used to choose representative keys and for memory traces).
    """
    b, hq, _, d = q.shape
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    kf = expand_kv(k.float(), hq)
    vf = expand_kv(v.float(), hq)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale  # (B, Hq, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (B, Hq, Tq)
    safe_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    probs = torch.exp(scores - safe_lse.unsqueeze(-1))  # rows with no key: exp(-inf) = 0
    out = torch.matmul(probs, vf).to(q.dtype)
    key_mass = None
    if return_key_mass:
        hkv = k.shape[1]
        key_mass = probs.sum(dim=2).view(b, hkv, hq // hkv, -1).sum(dim=2)
    return out, lse, key_mass


def merge_attention(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Combine attention over disjoint key sets into the result of one softmax over their union.

    parts: [(out (B, Hq, Tq, D), lse (B, Hq, Tq)), ...] -> (B, Hq, Tq, D) in the first out's dtype.
    """
    if len(parts) == 1:
        return parts[0][0]
    if len(parts) == 2:  # the common case (local + memory) in fewer passes: a weighted mean
        (o1, l1), (o2, l2) = parts
        w1 = torch.sigmoid((l1 - l2).nan_to_num_(0.0)).unsqueeze(-1)  # NaN: both empty, outs 0
        return torch.lerp(o2.float(), o1.float(), w1).to(o1.dtype)
    lses = torch.stack([lse for _, lse in parts])  # (P, B, Hq, Tq)
    total = torch.logsumexp(lses, dim=0)
    total = torch.where(torch.isfinite(total), total, torch.zeros_like(total))
    weights = torch.exp(lses - total)  # (P, B, Hq, Tq), 0 for empty parts
    out = sum(w.unsqueeze(-1) * o.float() for w, (o, _) in zip(weights, parts, strict=True))
    return out.to(parts[0][0].dtype)


# ------------------------------------------------------------------------------------------------
# Patterns and memory attention (the spec for memllm_kernels.cpu_blocked and the Triton kernels)


def pattern_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float | None = None,
    return_key_mass: bool = False,
) -> AttentionOutput:
    """Attention under ``pattern`` (see memllm_kernels.patterns), from a dense (Tq, Tk) mask: O(Tq * Tk).

    q (B, Hq, Tq, D), k/v (B, Hkv, Tk, D), queries bottom-right aligned. Any float dtype; math in
    float32. Returns AttentionOutput(out, lse, key_mass) as :func:`attention_with_lse`.
    """
    check_qkv(q, k, v)
    mask = token_mask(pattern, q.shape[2], k.shape[2], q.device)
    return AttentionOutput(*attention_with_lse(q, k, v, mask, scale, return_key_mass))


def gather_memory(
    pool: torch.Tensor, block_ids: torch.Tensor, pool_lens: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy retrieved blocks out of a pool (reference / CPU only; the Triton kernel reads in place).

    pool (n_blocks, Hkv, bs, D), block_ids (B, Hkv, C, S) -> keys (B, Hkv, C, S, bs, D) float32 and
    valid (B, Hkv, C, S, bs) bool (False for id -1 and for tokens past a block's length).
    """
    n_blocks, hkv, bs, _ = pool.shape
    safe = block_ids.clamp(min=0).long()
    heads = torch.arange(hkv, device=pool.device).view(1, hkv, 1, 1)
    gathered = pool[safe, heads].float()  # (B, Hkv, C, S, bs, D)
    lens = (
        torch.full((n_blocks,), bs, device=pool.device, dtype=torch.long)
        if pool_lens is None
        else pool_lens.to(pool.device).long()
    )
    valid = (block_ids >= 0).unsqueeze(-1) & (torch.arange(bs, device=pool.device) < lens[safe].unsqueeze(-1))
    return gathered, valid


def memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    block_ids: torch.Tensor,
    *,
    local: Pattern,
    q_mem: torch.Tensor | None = None,
    pool_lens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    scale: float | None = None,
    return_key_mass: bool = False,
) -> MemoryAttentionOutput:
    """One softmax over retrieved memory blocks and the local keys (sinks + window, or any pattern).

    q (B, Hq, Tq, D) scores the local keys k (B, Hkv, Tk, D) under ``local`` (bottom-right aligned);
    q_mem (same shape as q, default q) scores the memory keys: the caller rotates it at the one fixed
    RoPE distance memory sits at, and passes pool keys already rotated (or unrotated) as it chooses.
    Memory keys are visible to every query of their chunk. See memllm_kernels.common for pool/block_ids
    shapes. Returns MemoryAttentionOutput(out, lse, key_mass (B, Hkv, Tk), memory_mass (B, Hkv, C, S)).
    """
    check_qkv(q, k, v)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    groups = hq // hkv
    check_pool(pool_k, pool_v, hkv, d)
    q_mem = q if q_mem is None else q_mem
    if q_mem.shape != q.shape:
        raise ValueError(f"q_mem {tuple(q_mem.shape)} must match q {tuple(q.shape)}")
    ids, chunk = normalize_block_ids(block_ids.to(q.device), b, hkv, tq, chunk_size)
    n_chunks, n_sel, bs = ids.shape[2], ids.shape[3], pool_k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale

    mem_k, valid = gather_memory(pool_k, ids, pool_lens)  # (B, Hkv, C, S, bs, D), (B, Hkv, C, S, bs)
    mem_v, _ = gather_memory(pool_v, ids, pool_lens)
    mask = token_mask(local, tq, tk, q.device)  # (Tq, Tk)
    kf, vf = expand_kv(k.float(), hq), expand_kv(v.float(), hq)  # (B, Hq, Tk, D)

    out = torch.zeros(b, hq, tq, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
    key_mass = torch.zeros(b, hkv, tk, device=q.device) if return_key_mass else None
    memory_mass = torch.zeros(b, hkv, n_chunks, n_sel, device=q.device) if return_key_mass else None
    for c in range(n_chunks):
        rows = slice(c * chunk, min((c + 1) * chunk, tq))
        mk = expand_kv(mem_k[:, :, c].reshape(b, hkv, n_sel * bs, d), hq)  # (B, Hq, S*bs, D)
        mv = expand_kv(mem_v[:, :, c].reshape(b, hkv, n_sel * bs, d), hq)
        mvalid = expand_kv(valid[:, :, c].reshape(b, hkv, n_sel * bs, 1), hq)[..., 0]  # (B, Hq, S*bs)
        s_mem = torch.matmul(q_mem[:, :, rows].float(), mk.transpose(-1, -2)) * scale
        s_mem = s_mem.masked_fill(~mvalid.unsqueeze(2), float("-inf"))
        s_loc = torch.matmul(q[:, :, rows].float(), kf.transpose(-1, -2)) * scale
        s_loc = s_loc.masked_fill(~mask[rows], float("-inf"))
        scores = torch.cat([s_mem, s_loc], dim=-1)  # (B, Hq, rows, S*bs + Tk): one softmax
        row_lse = torch.logsumexp(scores, dim=-1)
        probs = torch.exp(scores - row_lse.unsqueeze(-1))
        p_mem, p_loc = probs[..., : n_sel * bs], probs[..., n_sel * bs :]
        out[:, :, rows] = torch.matmul(p_mem, mv) + torch.matmul(p_loc, vf)
        lse[:, :, rows] = row_lse
        if key_mass is not None and memory_mass is not None:
            key_mass += p_loc.sum(2).view(b, hkv, groups, tk).sum(2)
            memory_mass[:, :, c] = p_mem.sum(2).view(b, hkv, groups, n_sel, bs).sum((2, 4))
    return MemoryAttentionOutput(out.to(q.dtype), lse, key_mass, memory_mass)


def block_mass(key_mass: torch.Tensor, block_size: int) -> torch.Tensor:
    """(..., Tk) per-key mass -> (..., ceil(Tk / block_size)) mass per key block (last block ragged)."""
    tk = key_mass.shape[-1]
    n = -(-tk // block_size)
    padded = torch.nn.functional.pad(key_mass, (0, n * block_size - tk))
    return padded.view(*key_mass.shape[:-1], n, block_size).sum(-1)

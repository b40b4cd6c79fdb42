"""Block-sparse flash attention in Triton, driven by a :class:`~memllm_kernels.layouts.SparseLayout`.

One kernel serves every pattern of memllm_kernels.patterns: each program owns one query tile of one query
head and walks the CSR list of key tiles its tile visits, with an online softmax. Full tiles skip
the within-tile rule; partial tiles evaluate it in registers (memllm_kernels.triton_common.visible_tile),
so no mask tensor is ever materialised.

Shapes:  q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D); Hq % Hkv == 0 (GQA); Tq <= Tk, queries are the
         last Tq positions. Any strides (last dim need not be contiguous, but should be).
Dtypes:  float16 or bfloat16 in; out in q's dtype, lse float32 (natural log). Accumulation in float32.
Limits:  head_dim a power of two in [16, 256] (tuned for 64 and 128); CUDA tensors, or CPU tensors
         under TRITON_INTERPRET=1 (tests). Forward only (no autograd). Tiles: BLOCK_M x BLOCK_N =
         128 x 64 on GPU, 16 x 16 under the interpreter; the layout is built for those tiles.
Key mass (optional) is a second pass, memllm_kernels.triton_key_mass.
"""

from __future__ import annotations

import math

import torch

from memllm_kernels.common import AttentionOutput, check_qkv
from memllm_kernels.layouts import SparseLayout, build_layout
from memllm_kernels.patterns import Pattern
from memllm_kernels.triton_common import (
    HAS_TRITON,
    LOG2E,
    default_tiles,
    needs_upcast,
    require_supported,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    from memllm_kernels.triton_common import mma, online_softmax_step, visible_tile

    @triton.jit
    def attend_layout_tiles(
        acc,
        m_i,
        l_i,
        q,
        pos,
        qb,
        K,
        V,
        stride_kt,
        stride_kd,
        stride_vt,
        stride_vd,
        kv_blocks,
        kv_full,
        kv_count,
        max_kv,
        rand_ptr,
        n_rand_rows,
        TK,
        qk_scale,
        WINDOW,
        STRIDE,
        SUMMARY,
        N_GLOBAL,
        RAND_BLOCK,
        KIND: tl.constexpr,
        HAS_GLOBAL: tl.constexpr,
        N_RANDOM: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        """Fold every key tile listed for query tile ``qb`` into the online-softmax state.

        K, V point at this (batch, kv head); q (BLOCK_M, HEAD_DIM); pos (BLOCK_M,) query positions.
        """
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        n_tiles = tl.load(kv_count + qb)
        for t in range(0, n_tiles):
            kb = tl.load(kv_blocks + qb * max_kv + t)
            is_full = tl.load(kv_full + qb * max_kv + t)
            kj = kb * BLOCK_N + offs_n
            k_ok = kj < TK
            k = tl.load(K + kj[None, :] * stride_kt + offs_d[:, None] * stride_kd, mask=k_ok[None, :], other=0.0)
            v = tl.load(V + kj[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=k_ok[:, None], other=0.0)
            s = mma(q, k, UPCAST) * qk_scale  # (BLOCK_M, BLOCK_N) base-2 logits
            if (is_full == 0) | (kb * BLOCK_N + BLOCK_N > TK):
                vis = visible_tile(
                    pos,
                    kj,
                    rand_ptr,
                    n_rand_rows,
                    WINDOW,
                    STRIDE,
                    SUMMARY,
                    N_GLOBAL,
                    RAND_BLOCK,
                    KIND,
                    HAS_GLOBAL,
                    N_RANDOM,
                )
                s = tl.where(vis & k_ok[None, :], s, float("-inf"))
            acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, UPCAST)
        return acc, m_i, l_i

    @triton.jit
    def _block_sparse_fwd(
        Q, K, V, Out, Lse,
        kv_blocks, kv_full, kv_count, rand_ptr,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_ob, stride_oh, stride_ot, stride_od,
        H_Q, GROUPS, TQ, TK, max_kv, n_rand_rows, qk_scale,
        WINDOW, STRIDE, SUMMARY, N_GLOBAL, RAND_BLOCK,
        KIND: tl.constexpr,
        HAS_GLOBAL: tl.constexpr,
        N_RANDOM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        qb = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H_Q
        h = bh % H_Q
        hk = h // GROUPS
        offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, HEAD_DIM)
        q_ok = offs_m < TQ
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=q_ok[:, None], other=0.0)
        pos = offs_m + (TK - TQ)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, m_i, l_i = attend_layout_tiles(
            acc, m_i, l_i, q, pos, qb,
            K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh,
            stride_kt, stride_kd, stride_vt, stride_vd,
            kv_blocks, kv_full, kv_count, max_kv, rand_ptr, n_rand_rows, TK, qk_scale,
            WINDOW, STRIDE, SUMMARY, N_GLOBAL, RAND_BLOCK,
            KIND, HAS_GLOBAL, N_RANDOM, BLOCK_N, HEAD_DIM, UPCAST,
        )  # fmt: skip
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        out = acc / l_safe[:, None]
        lse = tl.where(l_i > 0, (m_i + tl.log2(l_safe)) / 1.4426950408889634, float("-inf"))
        o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=q_ok[:, None])
        tl.store(Lse + bh * TQ + offs_m, lse, mask=q_ok)


def pattern_args(layout: SparseLayout) -> dict[str, int]:
    """The pattern's runtime scalars and compile-time constants, as the kernels name them."""
    pat = layout.pattern
    return {
        "WINDOW": pat.window,
        "STRIDE": max(pat.stride, 1),
        "SUMMARY": pat.summary,
        "N_GLOBAL": pat.n_global,
        "RAND_BLOCK": pat.random_block,
        "KIND": pat.kind_code,
        "HAS_GLOBAL": pat.n_global > 0,
        "N_RANDOM": pat.n_random,
    }


def triton_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float | None = None,
    return_key_mass: bool = False,
    block_m: int | None = None,
    block_n: int | None = None,
) -> AttentionOutput:
    """Block-sparse attention under ``pattern``. Contract: memllm_kernels.reference.pattern_attention."""
    check_qkv(q, k, v)
    require_supported(q)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    bm, bn, warps, stages = default_tiles(d)
    bm, bn = block_m or bm, block_n or bn
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    layout = build_layout(pattern, tq, tk, bm, bn, str(q.device))
    out = torch.empty_like(q)
    lse = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
    grid = (layout.n_q_blocks, b * hq)
    _block_sparse_fwd[grid](
        q, k, v, out, lse,
        layout.kv_blocks, layout.kv_full, layout.kv_count, layout.rand_table,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        hq, hq // hkv, tq, tk, layout.max_kv, layout.rand_table.shape[0], scale * LOG2E,
        **pattern_args(layout),
        BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d,
        UPCAST=needs_upcast(q.dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    key_mass = None
    if return_key_mass:
        from memllm_kernels.triton_key_mass import layout_key_mass

        key_mass = layout_key_mass(q, k, lse, layout, scale)
    return AttentionOutput(out, lse, key_mass)

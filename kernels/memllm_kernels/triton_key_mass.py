"""Attention mass per key, in Triton: a second pass once the forward pass has each query's lse.

key_mass[b, hk, j] = sum over the query heads of kv group hk and over queries i of exp(s_ij - lse_i).
One program owns one key tile of one (batch, kv head) and walks the query tiles that visit it (the
layout's CSC lists), so there are no atomics and the result is deterministic. memory_mass does the
same for each retrieved block of a memory-attention call (one program per (batch, kv head, chunk,
selected block), summing over the block's tokens).

Shapes/dtypes/limits: as memllm_kernels.triton_block_sparse (float16 / bfloat16, head_dim a power of two
in [16, 256], CUDA or TRITON_INTERPRET=1); lse (B, Hq, Tq) float32 contiguous; masses float32.
"""

from __future__ import annotations

import torch

from memllm_kernels.layouts import SparseLayout
from memllm_kernels.triton_common import HAS_TRITON, LOG2E, default_tiles, needs_upcast

if HAS_TRITON:
    import triton
    import triton.language as tl

    from memllm_kernels.triton_common import mma, visible_tile

    @triton.jit
    def _key_mass_kernel(
        Q, K, Lse, Mass,
        q_blocks, q_full, q_count, rand_ptr,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_kb, stride_kh, stride_kt, stride_kd,
        H_Q, H_KV, GROUPS, TQ, TK, max_q, n_rand_rows, qk_scale,
        WINDOW, STRIDE, SUMMARY, N_GLOBAL, RAND_BLOCK,
        KIND: tl.constexpr,
        HAS_GLOBAL: tl.constexpr,
        N_RANDOM: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        kb = tl.program_id(0)
        bhk = tl.program_id(1)
        b = bhk // H_KV
        hk = bhk % H_KV
        offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_DIM)
        k_ok = offs_n < TK
        k_ptrs = K + b * stride_kb + hk * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
        k = tl.load(k_ptrs, mask=k_ok[None, :], other=0.0)  # (HEAD_DIM, BLOCK_N)
        mass = tl.zeros([BLOCK_N], dtype=tl.float32)
        n_tiles = tl.load(q_count + kb)
        for g in range(0, GROUPS):
            h = hk * GROUPS + g
            for t in range(0, n_tiles):
                qb = tl.load(q_blocks + kb * max_q + t)
                is_full = tl.load(q_full + kb * max_q + t)
                offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
                q_ok = offs_m < TQ
                q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
                q = tl.load(q_ptrs, mask=q_ok[:, None], other=0.0)
                lse = tl.load(Lse + (b * H_Q + h) * TQ + offs_m, mask=q_ok, other=float("inf"))
                s = mma(q, k, UPCAST) * qk_scale - (lse * 1.4426950408889634)[:, None]
                ok = q_ok[:, None] & k_ok[None, :]
                if is_full == 0:
                    vis = visible_tile(
                        offs_m + (TK - TQ),
                        offs_n,
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
                    ok = ok & vis
                p = tl.where(ok, tl.exp2(s), 0.0)
                mass += tl.sum(p, 0)
        tl.store(Mass + bhk * TK + offs_n, mass, mask=k_ok)

    @triton.jit
    def _memory_mass_kernel(
        QM, Lse, PK, Ids, Lens, Mass,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_pn, stride_ph, stride_pt, stride_pd,
        stride_ib, stride_ih, stride_ic, stride_is,
        H_Q, H_KV, GROUPS, TQ, CHUNK, N_CHUNKS, N_SEL, POOL_BS, qk_scale,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        UPCAST: tl.constexpr,
    ):  # fmt: skip
        sel = tl.program_id(0)  # c * N_SEL + s
        bhk = tl.program_id(1)
        b = bhk // H_KV
        hk = bhk % H_KV
        c = sel // N_SEL
        s_idx = sel % N_SEL
        bid = tl.load(Ids + b * stride_ib + hk * stride_ih + c * stride_ic + s_idx * stride_is)
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        if bid >= 0:
            blen = tl.load(Lens + bid)
            offs_d = tl.arange(0, HEAD_DIM)
            q_lo = c * CHUNK
            q_hi = tl.minimum(q_lo + CHUNK, TQ)
            for t0 in range(0, POOL_BS, BLOCK_N):
                offs_n = t0 + tl.arange(0, BLOCK_N)
                k_ok = offs_n < blen
                k_ptrs = (
                    PK + bid * stride_pn + hk * stride_ph + offs_n[None, :] * stride_pt + offs_d[:, None] * stride_pd
                )
                k = tl.load(k_ptrs, mask=k_ok[None, :], other=0.0)
                for g in range(0, GROUPS):
                    h = hk * GROUPS + g
                    for m0 in range(q_lo, q_hi, BLOCK_M):
                        offs_m = m0 + tl.arange(0, BLOCK_M)
                        q_ok = offs_m < q_hi
                        q_ptrs = (
                            QM
                            + b * stride_qb
                            + h * stride_qh
                            + offs_m[:, None] * stride_qt
                            + offs_d[None, :] * stride_qd
                        )
                        q = tl.load(q_ptrs, mask=q_ok[:, None], other=0.0)
                        lse = tl.load(Lse + (b * H_Q + h) * TQ + offs_m, mask=q_ok, other=float("inf"))
                        s = mma(q, k, UPCAST) * qk_scale - (lse * 1.4426950408889634)[:, None]
                        p = tl.where(q_ok[:, None] & k_ok[None, :], tl.exp2(s), 0.0)
                        total += tl.sum(p, 0)
        tl.store(Mass + bhk * (N_CHUNKS * N_SEL) + sel, tl.sum(total, 0))


def layout_key_mass(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, layout: SparseLayout, scale: float
) -> torch.Tensor:
    """Per-key mass (B, Hkv, Tk) float32 for a finished forward pass over ``layout``."""
    from memllm_kernels.triton_block_sparse import pattern_args

    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    _, _, warps, stages = default_tiles(d)
    mass = torch.empty(b, hkv, tk, dtype=torch.float32, device=q.device)
    grid = (layout.n_k_blocks, b * hkv)
    _key_mass_kernel[grid](
        q, k, lse.contiguous(), mass,
        layout.q_blocks, layout.q_full, layout.q_count, layout.rand_table,
        *q.stride(), *k.stride(),
        hq, hkv, hq // hkv, tq, tk, layout.q_blocks.shape[1], layout.rand_table.shape[0], scale * LOG2E,
        **pattern_args(layout),
        BLOCK_M=layout.block_q, BLOCK_N=layout.block_k, HEAD_DIM=d,
        UPCAST=needs_upcast(q.dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return mass


def memory_block_mass(
    q_mem: torch.Tensor,
    lse: torch.Tensor,
    pool_k: torch.Tensor,
    block_ids: torch.Tensor,
    pool_lens: torch.Tensor,
    chunk: int,
    scale: float,
    block_m: int,
    block_n: int,
) -> torch.Tensor:
    """Mass per retrieved block (B, Hkv, n_chunks, n_sel) float32; block_ids (B, Hkv, C, S) int32/64."""
    b, hq, tq, d = q_mem.shape
    hkv = pool_k.shape[1]
    n_chunks, n_sel = block_ids.shape[2], block_ids.shape[3]
    _, _, warps, stages = default_tiles(d)
    mass = torch.empty(b, hkv, n_chunks, n_sel, dtype=torch.float32, device=q_mem.device)
    grid = (n_chunks * n_sel, b * hkv)
    _memory_mass_kernel[grid](
        q_mem, lse.contiguous(), pool_k, block_ids, pool_lens, mass,
        *q_mem.stride(), *pool_k.stride(), *block_ids.stride(),
        hq, hkv, hq // hkv, tq, chunk, n_chunks, n_sel, pool_k.shape[2], scale * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_DIM=d,
        UPCAST=needs_upcast(q_mem.dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return mass

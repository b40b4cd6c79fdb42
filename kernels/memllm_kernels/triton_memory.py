"""Memory attention in Triton: retrieved blocks read in place from a block pool, one online softmax.

Each program owns one query tile of one query head. It first folds in the memory blocks its chunk
retrieved, reading ``pool_k[id, kv_head]`` / ``pool_v[id, kv_head]`` by index (no gathered copy;
the pool may be any strided view, e.g. a sequence's own keys seen as blocks), scored with q_mem;
then the local key tiles of the local pattern (sinks + window, or any memllm_kernels.patterns pattern)
scored with q, exactly as memllm_kernels.triton_block_sparse. One (max, sum, acc) state spans both, so the
result is one softmax over memory and local keys.

Shapes:  q, q_mem (B, Hq, Tq, D); k, v (B, Hkv, Tk, D); pool_k, pool_v (n_blocks, Hkv, bs, D);
         pool_lens (n_blocks,) int; block_ids (B, Hkv, n_chunks, n_sel) int, -1 = none; query row i
         uses chunk i // chunk_size.
Dtypes:  float16 / bfloat16 (q, k, v, pools alike); out q's dtype, lse float32, masses float32.
Limits:  head_dim a power of two in [16, 256] (tuned for 64, 128); CUDA or TRITON_INTERPRET=1;
         with several chunks, chunk_size must be a multiple of 16 (query tiles never straddle chunks);
         tensors under 2**31 elements. Forward only.
"""

from __future__ import annotations

import math

import torch

from memllm_kernels.common import MemoryAttentionOutput, check_pool, check_qkv, normalize_block_ids
from memllm_kernels.layouts import build_layout
from memllm_kernels.patterns import Pattern
from memllm_kernels.triton_common import HAS_TRITON, LOG2E, default_tiles, needs_upcast, require_supported

if HAS_TRITON:
    import triton
    import triton.language as tl

    from memllm_kernels.triton_block_sparse import attend_layout_tiles
    from memllm_kernels.triton_common import mma, online_softmax_step

    @triton.jit
    def _memory_fwd(
        Q, QM, K, V, PK, PV, Ids, Lens, Out, Lse,
        kv_blocks, kv_full, kv_count, rand_ptr,
        stride_qb, stride_qh, stride_qt, stride_qd,
        stride_mb, stride_mh, stride_mt, stride_md,
        stride_kb, stride_kh, stride_kt, stride_kd,
        stride_vb, stride_vh, stride_vt, stride_vd,
        stride_pn, stride_ph, stride_pt, stride_pd,
        stride_wn, stride_wh, stride_wt, stride_wd,
        stride_ib, stride_ih, stride_ic, stride_is,
        stride_ob, stride_oh, stride_ot, stride_od,
        H_Q, GROUPS, TQ, TK, CHUNK, N_SEL, POOL_BS, max_kv, n_rand_rows, qk_scale,
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
        offs_n = tl.arange(0, BLOCK_N)
        q_ok = offs_m < TQ
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

        # memory: the blocks retrieved for this tile's chunk, read from the pool by id
        qm_ptrs = QM + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_mt + offs_d[None, :] * stride_md
        qm = tl.load(qm_ptrs, mask=q_ok[:, None], other=0.0)
        c = (qb * BLOCK_M) // CHUNK
        id_row = Ids + b * stride_ib + hk * stride_ih + c * stride_ic
        for s_idx in range(0, N_SEL):
            bid = tl.load(id_row + s_idx * stride_is)
            if bid >= 0:
                blen = tl.load(Lens + bid)
                pk = PK + bid.to(tl.int64) * stride_pn + hk * stride_ph
                pv = PV + bid.to(tl.int64) * stride_wn + hk * stride_wh
                for t0 in range(0, POOL_BS, BLOCK_N):
                    kj = t0 + offs_n
                    k_ok = kj < blen
                    k = tl.load(
                        pk + kj[None, :] * stride_pt + offs_d[:, None] * stride_pd,
                        mask=k_ok[None, :],
                        other=0.0,
                    )
                    v = tl.load(
                        pv + kj[:, None] * stride_wt + offs_d[None, :] * stride_wd,
                        mask=k_ok[:, None],
                        other=0.0,
                    )
                    s = tl.where(k_ok[None, :], mma(qm, k, UPCAST) * qk_scale, float("-inf"))
                    acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, UPCAST)

        # local: sinks + window (or any pattern) over this sequence's keys
        q_ptrs = Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=q_ok[:, None], other=0.0)
        acc, m_i, l_i = attend_layout_tiles(
            acc, m_i, l_i, q, offs_m + (TK - TQ), qb,
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


def _query_tile(default_m: int, q_len: int, chunk: int, n_chunks: int) -> int:
    """Largest power-of-two tile <= default_m (>= 16) that never straddles a chunk boundary."""
    if n_chunks == 1:
        return default_m
    bm = default_m
    while bm >= 16:
        if chunk % bm == 0:
            return bm
        bm //= 2
    raise ValueError(f"chunk_size {chunk} must be a multiple of 16 for the Triton memory kernel")


def triton_memory_attention(
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
    """Memory attention reading the pool in place. Contract: memllm_kernels.reference.memory_attention."""
    check_qkv(q, k, v)
    require_supported(q)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    check_pool(pool_k, pool_v, hkv, d)
    for name, t in (("k", k), ("v", v), ("pool_k", pool_k), ("pool_v", pool_v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from q's {q.dtype}")
    q_mem = q if q_mem is None else q_mem
    if q_mem.shape != q.shape or q_mem.dtype != q.dtype:
        raise ValueError(f"q_mem {tuple(q_mem.shape)} {q_mem.dtype} must match q {tuple(q.shape)} {q.dtype}")
    ids, chunk = normalize_block_ids(block_ids.to(q.device), b, hkv, tq, chunk_size)
    n_chunks, n_sel, pool_bs = ids.shape[2], ids.shape[3], pool_k.shape[2]
    lens = (
        torch.full((pool_k.shape[0],), pool_bs, dtype=torch.int32, device=q.device)
        if pool_lens is None
        else pool_lens.to(device=q.device, dtype=torch.int32)
    )
    bm, bn, warps, stages = default_tiles(d)
    bm = _query_tile(bm, tq, chunk, n_chunks)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    layout = build_layout(local, tq, tk, bm, bn, str(q.device))
    from memllm_kernels.triton_block_sparse import pattern_args

    out = torch.empty_like(q)
    lse = torch.empty(b, hq, tq, dtype=torch.float32, device=q.device)
    grid = (layout.n_q_blocks, b * hq)
    _memory_fwd[grid](
        q, q_mem, k, v, pool_k, pool_v, ids, lens, out, lse,
        layout.kv_blocks, layout.kv_full, layout.kv_count, layout.rand_table,
        *q.stride(), *q_mem.stride(), *k.stride(), *v.stride(),
        *pool_k.stride(), *pool_v.stride(), *ids.stride(), *out.stride(),
        hq, hq // hkv, tq, tk, chunk, n_sel, pool_bs, layout.max_kv, layout.rand_table.shape[0],
        scale * LOG2E,
        **pattern_args(layout),
        BLOCK_M=bm, BLOCK_N=bn, HEAD_DIM=d,
        UPCAST=needs_upcast(q.dtype), num_warps=warps, num_stages=stages,
    )  # fmt: skip
    key_mass = memory_mass = None
    if return_key_mass:
        from memllm_kernels.triton_key_mass import layout_key_mass, memory_block_mass

        key_mass = layout_key_mass(q, k, lse, layout, scale)
        memory_mass = memory_block_mass(q_mem, lse, pool_k, ids, lens, chunk, scale, bm, bn)
    return MemoryAttentionOutput(out, lse, key_mass, memory_mass)

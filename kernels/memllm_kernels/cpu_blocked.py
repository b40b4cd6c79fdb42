"""Block-sparse attention in plain torch: cost follows the pattern's tiles, not Tq * Tk.

For each query tile the keys of its visited key tiles (from the :class:`~memllm_kernels.layouts.SparseLayout`
CSR lists) are taken as one slice when contiguous (a window) or gathered, scored with one matmul per
(batch, kv head) with the query heads of the group stacked as rows (no kv expansion), masked only
where a tile is not full, and normalised in one softmax (memory keys, when present, join the same
softmax). Works on any device torch supports; it is the default backend for CPU tensors.

Shapes/dtypes: as memllm_kernels.common (any float dtype; math in float32, out cast to q's dtype).
Limits: tiles are ``block_size`` square; memory per step is O(Hq * block_size * visible keys).
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
from memllm_kernels.layouts import SparseLayout, build_layout
from memllm_kernels.patterns import Pattern, visible
from memllm_kernels.reference import gather_memory

DEFAULT_BLOCK = 128


class _LocalKeys:
    """The keys one query tile visits: contiguous slice or gathered indices, plus partial tiles."""

    def __init__(self, layout: SparseLayout, qb: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n = int(layout.kv_count[qb])
        tiles = layout.kv_blocks[qb, :n].tolist()
        fulls = layout.kv_full[qb, :n].tolist()
        bk, tk = layout.block_k, layout.k_len
        self.partial = [i for i, f in enumerate(fulls) if not f]
        if tiles[-1] - tiles[0] + 1 == n:  # contiguous: a view, no copy
            start, stop = tiles[0] * bk, min((tiles[-1] + 1) * bk, tk)
            self.index = torch.arange(start, stop, device=k.device)
            self.k, self.v = k[:, :, start:stop], v[:, :, start:stop]
        else:
            tile_t = torch.tensor(tiles, device=k.device)
            idx = (tile_t[:, None] * bk + torch.arange(bk, device=k.device)[None, :]).flatten()
            self.index = idx[idx < tk]
            self.k, self.v = k.index_select(2, self.index), v.index_select(2, self.index)
        self.tile_starts = [t * bk for t in tiles]
        self.block_k = bk

    def apply_mask_(self, layout: SparseLayout, pos: torch.Tensor, scores: torch.Tensor, groups: int) -> None:
        """Set scores (B, Hkv, G*R, n_keys) of hidden pairs to -inf for query positions ``pos`` (R,).

        Only partial tiles are touched; when most tiles are partial the rule is evaluated once.
        """
        if not self.partial:
            return
        pat, table = layout.pattern, layout.rand_table
        b, hkv, gr, n = scores.shape
        view = scores.view(b, hkv, groups, gr // groups, n)
        if len(self.partial) * 2 > len(self.tile_starts):
            view.masked_fill_(~visible(pat, pos[:, None], self.index[None, :], table), float("-inf"))
            return
        for i in self.partial:
            lo, hi = i * self.block_k, min((i + 1) * self.block_k, n)
            hidden = ~visible(pat, pos[:, None], self.index[None, lo:hi], table)
            view[..., lo:hi].masked_fill_(hidden, float("-inf"))


def _softmax_parts(
    scores: list[torch.Tensor], values: list[torch.Tensor], want_probs: bool
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """One softmax over concatenated score parts (each (B, Hkv, R, n_i), -inf = masked).

    Returns out (B, Hkv, R, D) float32, lse (B, Hkv, R), and the probabilities per part if asked.
    """
    m = torch.stack([s.amax(-1) for s in scores]).amax(0)  # (B, Hkv, R); finite: every row sees itself
    exps = [s.sub_(m.unsqueeze(-1)).exp_() for s in scores]  # in place: scores are scratch
    denom = sum(e.sum(-1) for e in exps)
    out = sum(torch.matmul(e, val) for e, val in zip(exps, values, strict=True))
    out = out / denom.unsqueeze(-1)
    lse = m + torch.log(denom)
    probs = [e / denom.unsqueeze(-1) for e in exps] if want_probs else []
    return out, lse, probs


def _rows_of(q5: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    """(B, Hkv, G, Tq, D) -> the query rows [r0, r1) of every group head as (B, Hkv, G*R, D)."""
    b, hkv, g, _, d = q5.shape
    return q5[:, :, :, r0:r1].reshape(b, hkv, g * (r1 - r0), d)


def blocked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern,
    scale: float | None = None,
    return_key_mass: bool = False,
    block_size: int = DEFAULT_BLOCK,
) -> AttentionOutput:
    """Attention under ``pattern`` visiting only the layout's tiles. Contract: reference.pattern_attention."""
    res = _blocked(q, k, v, pattern, scale, return_key_mass, block_size, memory=None)
    return AttentionOutput(res.out, res.lse, res.key_mass)


def blocked_memory_attention(
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
    block_size: int = DEFAULT_BLOCK,
) -> MemoryAttentionOutput:
    """Memory attention (one softmax: retrieved blocks + local tiles); see reference.memory_attention."""
    check_qkv(q, k, v)
    check_pool(pool_k, pool_v, k.shape[1], q.shape[3])
    if q_mem is not None and q_mem.shape != q.shape:
        raise ValueError(f"q_mem {tuple(q_mem.shape)} must match q {tuple(q.shape)}")
    ids, chunk = normalize_block_ids(block_ids.to(q.device), q.shape[0], k.shape[1], q.shape[2], chunk_size)
    memory = (pool_k, pool_v, ids, chunk, pool_lens, q if q_mem is None else q_mem)
    return _blocked(q, k, v, local, scale, return_key_mass, block_size, memory=memory)


def _blocked(q, k, v, pattern, scale, return_key_mass, block_size, memory) -> MemoryAttentionOutput:
    check_qkv(q, k, v)
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    layout = build_layout(pattern, tq, tk, block_size, block_size, str(q.device))
    q5 = (q.float() * scale).view(b, hkv, g, tq, d)  # (B, Hkv, G, Tq, D), pre-scaled
    kf, vf = k.float(), v.float()
    out5 = torch.empty(b, hkv, g, tq, d, dtype=torch.float32, device=q.device)
    lse5 = torch.empty(b, hkv, g, tq, dtype=torch.float32, device=q.device)
    key_mass = torch.zeros(b, hkv, tk, device=q.device) if return_key_mass else None

    mem_cache: dict[int, tuple | None] = {}
    memory_mass = None
    if memory is not None:
        pool_k, pool_v, ids, chunk, pool_lens, q_mem = memory
        qm5 = (q_mem.float() * scale).view(b, hkv, g, tq, d)
        n_chunks, n_sel, bs = ids.shape[2], ids.shape[3], pool_k.shape[2]
        memory_mass = torch.zeros(b, hkv, n_chunks, n_sel, device=q.device) if return_key_mass else None

    def memory_keys(c: int) -> tuple | None:
        """Chunk c's retrieved blocks (only slots some row uses), gathered once; None if there are none."""
        if c not in mem_cache:
            mem_cache.clear()  # chunks are visited in order: keep one
            slots = (ids[:, :, c] >= 0).flatten(0, 1).any(0).nonzero().flatten()  # (S',)
            if slots.numel() == 0:
                mem_cache[c] = None
                return None
            sub = ids[:, :, c : c + 1, slots]  # (B, Hkv, 1, S')
            mk, valid = gather_memory(pool_k, sub, pool_lens)  # (B, Hkv, 1, S', bs, D)
            mv, _ = gather_memory(pool_v, sub, pool_lens)
            n = slots.numel() * bs
            mem_cache[c] = (mk.view(b, hkv, n, d), mv.view(b, hkv, n, d), valid.view(b, hkv, 1, n), slots)
        return mem_cache[c]

    positions = torch.arange(tk - tq, tk, device=q.device)
    for qb in range(layout.n_q_blocks):
        keys = _LocalKeys(layout, qb, kf, vf)
        t0, t1 = qb * block_size, min((qb + 1) * block_size, tq)
        # split the tile's rows at memory chunk boundaries (one set of memory blocks per segment)
        cuts = [t0] if memory is None else sorted({t0, *range((t0 // chunk + 1) * chunk, t1, chunk)})
        for r0, r1 in zip(cuts, [*cuts[1:], t1], strict=True):
            rows = r1 - r0
            s_loc = torch.matmul(_rows_of(q5, r0, r1), keys.k.transpose(-1, -2))  # (B, Hkv, G*R, n)
            keys.apply_mask_(layout, positions[r0:r1], s_loc, g)
            scores, values = [s_loc], [keys.v]
            mem = None if memory is None else memory_keys(r0 // chunk)
            if mem is not None:
                mk, mv, valid, slots = mem
                s_mem = torch.matmul(_rows_of(qm5, r0, r1), mk.transpose(-1, -2))  # (B, Hkv, G*R, S*bs)
                s_mem.masked_fill_(~valid, float("-inf"))
                scores.append(s_mem)
                values.append(mv)
            out, lse, probs = _softmax_parts(scores, values, return_key_mass)
            out5[:, :, :, r0:r1] = out.view(b, hkv, g, rows, d)
            lse5[:, :, :, r0:r1] = lse.view(b, hkv, g, rows)
            if key_mass is not None:
                key_mass.index_add_(2, keys.index, probs[0].sum(2))  # sum over rows
                if memory_mass is not None and mem is not None:
                    mass = probs[1].sum(2).view(b, hkv, len(slots), bs).sum(-1)  # (B, Hkv, S')
                    memory_mass[:, :, r0 // chunk, slots] += mass
    return MemoryAttentionOutput(out5.view(b, hq, tq, d).to(q.dtype), lse5.view(b, hq, tq), key_mass, memory_mass)

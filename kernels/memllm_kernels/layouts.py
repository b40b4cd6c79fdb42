"""Block layouts: which (query tile, key tile) pairs a pattern touches, derived in closed form.

A :class:`SparseLayout` is a :class:`~memllm_kernels.patterns.Pattern` materialised for ``q_len`` queries
over ``k_len`` keys at a tile size ``(block_q, block_k)``:

- ``any_``  (n_q_blocks, n_k_blocks) bool: the tile holds at least one visible (query, key) pair.
  Exact (never a false positive or negative), so block-sparse work equals the pattern's tiles.
- ``full``  (n_q_blocks, n_k_blocks) bool, a subset of ``any_``: every pair of the tile is visible
  and in bounds, so a kernel may skip the within-tile rule. Conservative: a tile left out of
  ``full`` is evaluated with :func:`memllm_kernels.patterns.visible`, which is always correct.
- CSR lists per query tile (``kv_blocks``, ``kv_full``, ``kv_count``) drive the forward kernels;
  CSC lists per key tile (``q_blocks``, ``q_full``, ``q_count``) drive the key-mass pass.

The within-tile masks are the pattern's rule (:func:`memllm_kernels.patterns.visible`), evaluated where a
tile is not full: so the reference, the CPU path and the Triton kernels share one description.
Everything is computed from tile bounds in O(n_q_blocks * n_k_blocks), never O(q_len * k_len).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from memllm_kernels.patterns import Pattern, random_table


@dataclass(frozen=True)
class SparseLayout:
    """A pattern at one (q_len, k_len, block_q, block_k). Index tensors are int32 on ``device``."""

    pattern: Pattern
    q_len: int
    k_len: int
    block_q: int
    block_k: int
    any_: torch.Tensor  # (n_q_blocks, n_k_blocks) bool
    full: torch.Tensor  # (n_q_blocks, n_k_blocks) bool
    kv_blocks: torch.Tensor  # (n_q_blocks, max(1, max_kv)) int32, ascending, padded with 0
    kv_full: torch.Tensor  # (n_q_blocks, max(1, max_kv)) int32, 1 = full tile
    kv_count: torch.Tensor  # (n_q_blocks,) int32
    q_blocks: torch.Tensor  # (n_k_blocks, max(1, max_q)) int32, ascending, padded with 0
    q_full: torch.Tensor  # (n_k_blocks, max(1, max_q)) int32
    q_count: torch.Tensor  # (n_k_blocks,) int32
    rand_table: torch.Tensor  # (n_rows, max(1, n_random)) int32, -1 = none (see random_table)

    @property
    def q_offset(self) -> int:
        return self.k_len - self.q_len

    @property
    def n_q_blocks(self) -> int:
        return self.any_.shape[0]

    @property
    def n_k_blocks(self) -> int:
        return self.any_.shape[1]

    @property
    def max_kv(self) -> int:
        return self.kv_blocks.shape[1]

    def tile_pairs(self) -> int:
        """(query, key) pairs inside visited tiles (ragged edges excluded): a block-sparse kernel's work."""
        rows = torch.full((self.n_q_blocks,), self.block_q, dtype=torch.int64)
        rows[-1] = self.q_len - (self.n_q_blocks - 1) * self.block_q
        cols = torch.full((self.n_k_blocks,), self.block_k, dtype=torch.int64)
        cols[-1] = self.k_len - (self.n_k_blocks - 1) * self.block_k
        return int((self.any_.cpu().long() * rows[:, None] * cols[None, :]).sum())

    def density(self) -> float:
        """Visited tiles over the tiles of the causal triangle's bounding square."""
        return float(self.any_.float().mean())


def _tile_bounds(q_len: int, k_len: int, block_q: int, block_k: int) -> tuple[torch.Tensor, ...]:
    off = k_len - q_len
    nqb, nkb = -(-q_len // block_q), -(-k_len // block_k)
    qb = torch.arange(nqb, dtype=torch.int64)
    kb = torch.arange(nkb, dtype=torch.int64)
    p0 = (qb * block_q + off)[:, None]  # (nqb, 1) first query position of each tile
    p1 = (torch.clamp((qb + 1) * block_q, max=q_len) - 1 + off)[:, None]
    j0 = (kb * block_k)[None, :]  # (1, nkb)
    j1 = (torch.clamp((kb + 1) * block_k, max=k_len) - 1)[None, :]
    return p0, p1, j0, j1


def _local_any_all(pattern: Pattern, p0, p1, j0, j1) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, all) of causal & local over each tile; d = p - j spans [p0 - j1, p1 - j0]."""
    dmin, dmax = p0 - j1, p1 - j0
    lo = torch.clamp(dmin, min=0)  # smallest causal difference
    causal_any = dmax >= 0
    causal_all = dmin >= 0
    if pattern.kind == "full":
        return causal_any, causal_all
    if pattern.kind == "window":
        w = pattern.window
        return causal_any & (lo <= w - 1), causal_all & (dmax <= w - 1)
    s = pattern.stride
    if pattern.kind == "strided":
        has_multiple = (torch.div(dmax, s, rounding_mode="floor") * s) >= lo
        any_ = causal_any & ((lo <= s - 1) | has_multiple)
        all_ = causal_all & ((dmax <= s - 1) | torch.tensor(s == 1))
        return any_, all_
    # fixed: same segment (causal inside it) or a summary key
    c = pattern.summary
    mlo = torch.maximum(p0 // s, j0 // s)
    mhi = torch.minimum(p1 // s, j1 // s)
    first_ok = torch.maximum(j0, mlo * s) <= torch.minimum(p1, mlo * s + s - 1)
    seg_any = (mlo <= mhi) & (first_ok | (mhi > mlo))
    seg_all = (p0 // s == p1 // s) & (j0 // s == j1 // s) & (p0 // s == j0 // s) & causal_all
    hi = torch.minimum(j1, p1)
    cand = torch.where(hi % s >= s - c, hi, (hi // s) * s - 1)
    sum_any = (hi >= j0) & (cand >= j0)
    sum_all = (j0 // s == j1 // s) & (j0 % s >= s - c) & causal_all
    return seg_any | sum_any, seg_all | sum_all


def _global_any_all(pattern: Pattern, p0, p1, j0, j1) -> tuple[torch.Tensor, torch.Tensor]:
    g = pattern.n_global
    key_any = (j0 < g) & (j0 <= p1)
    key_all = (j1 < g) & (j1 <= p0)
    qry_any = (p0 < g) & (j0 <= torch.clamp(p1, max=g - 1))
    qry_all = (p1 < g) & (j1 <= p0)
    return key_any | qry_any, key_all | qry_all


def _random_any_all(pattern: Pattern, table: torch.Tensor, k_len: int, p0, p1, j0, j1):
    """Random blocks are whole earlier blocks: count covered cells with a summed-area table."""
    rb = pattern.random_block
    n_rows = table.shape[0]
    n_kcols = -(-k_len // rb)
    cells = torch.zeros(n_rows, n_kcols + 1, dtype=torch.int32)
    ids = table.long()
    cells.scatter_(1, torch.where(ids >= 0, ids, n_kcols), 1)  # -1 lands in the spare last column
    cells = cells[:, :n_kcols]
    sat = torch.zeros(n_rows + 1, n_kcols + 1, dtype=torch.int64)
    sat[1:, 1:] = cells.long().cumsum(0).cumsum(1)
    r0, r1 = p0 // rb, p1 // rb  # (nqb, 1) row range (inclusive)
    c0, c1 = j0 // rb, j1 // rb  # (1, nkb)
    total = sat[r1 + 1, c1 + 1] - sat[r0, c1 + 1] - sat[r1 + 1, c0] + sat[r0, c0]
    area = (r1 - r0 + 1) * (c1 - c0 + 1)
    return total > 0, total == area


def _csr(mask: torch.Tensor, full: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row-wise ascending column lists of ``mask``; (indices, full flags, counts), padded with 0."""
    count = mask.sum(1)
    width = max(1, int(count.max()) if mask.numel() else 1)
    n_cols = mask.shape[1]
    # sort key: visited columns first in ascending order, then the rest
    cols = torch.arange(n_cols).expand_as(mask)
    key = torch.where(mask, cols, cols + n_cols)
    order = key.argsort(dim=1)[:, :width]
    valid = torch.arange(width)[None, :] < count[:, None]
    idx = torch.where(valid, order, torch.zeros_like(order))
    flags = torch.where(valid, torch.gather(full, 1, order).long(), torch.zeros_like(order))
    return idx.int(), flags.int(), count.int()


def build_layout_uncached(
    pattern: Pattern, q_len: int, k_len: int, block_q: int, block_k: int, device: str = "cpu"
) -> SparseLayout:
    """Build a :class:`SparseLayout` (see :func:`build_layout`, which caches)."""
    if not 0 < q_len <= k_len:
        raise ValueError(f"need 0 < q_len <= k_len, got {q_len}, {k_len}")
    if block_q < 1 or block_k < 1:
        raise ValueError(f"block sizes must be positive, got {block_q}, {block_k}")
    p0, p1, j0, j1 = _tile_bounds(q_len, k_len, block_q, block_k)
    any_, all_ = _local_any_all(pattern, p0, p1, j0, j1)
    if pattern.n_global:
        g_any, g_all = _global_any_all(pattern, p0, p1, j0, j1)
        any_, all_ = any_ | g_any, all_ | g_all
    table = random_table(pattern, k_len)
    if pattern.n_random:
        r_any, r_all = _random_any_all(pattern, table, k_len, p0, p1, j0, j1)
        any_, all_ = any_ | r_any, all_ | r_all
    full = all_ & any_
    kv_blocks, kv_full, kv_count = _csr(any_, full)
    q_blocks, q_full, q_count = _csr(any_.T.contiguous(), full.T.contiguous())
    dev = torch.device(device)
    return SparseLayout(
        pattern=pattern,
        q_len=q_len,
        k_len=k_len,
        block_q=block_q,
        block_k=block_k,
        any_=any_.to(dev),
        full=full.to(dev),
        kv_blocks=kv_blocks.to(dev),
        kv_full=kv_full.to(dev),
        kv_count=kv_count.to(dev),
        q_blocks=q_blocks.to(dev),
        q_full=q_full.to(dev),
        q_count=q_count.to(dev),
        rand_table=table.to(dev),
    )


@functools.lru_cache(maxsize=128)
def build_layout(
    pattern: Pattern, q_len: int, k_len: int, block_q: int, block_k: int, device: str = "cpu"
) -> SparseLayout:
    """Cached :func:`build_layout_uncached`: one layout per (pattern, lengths, tiles, device).

    Layouts are immutable; callers must not write into their tensors.
    """
    return build_layout_uncached(pattern, q_len, k_len, block_q, block_k, device)

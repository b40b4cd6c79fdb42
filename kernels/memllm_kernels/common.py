"""Result types and argument checks shared by every backend.

Conventions (all backends):

- q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D); Hq % Hkv == 0 (query head h reads kv head h // (Hq // Hkv));
  Tq <= Tk and the queries are the last Tq positions (bottom-right aligned causal patterns).
- Memory pool: pool_k, pool_v (n_blocks, Hkv, block_size, D), any strides (a view of another tensor
  is fine); pool_lens (n_blocks,) int valid tokens per block (default: all block_size).
- block_ids: (B, Hkv, n_chunks, n_sel) int, -1 = no block. Query row i uses chunk i // chunk_size.
  Ids in one row must be distinct (a repeated id would be attended twice).
- Outputs: out in q's dtype, lse float32 (natural log), masses float32.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class AttentionOutput(NamedTuple):
    """out (B, Hq, Tq, D) q.dtype; lse (B, Hq, Tq) float32; key_mass (B, Hkv, Tk) float32 or None.

    key_mass[b, h, j] = sum over the query heads of kv group h and over queries of softmax prob of key j.
    """

    out: torch.Tensor
    lse: torch.Tensor
    key_mass: torch.Tensor | None


class MemoryAttentionOutput(NamedTuple):
    """AttentionOutput plus memory_mass (B, Hkv, n_chunks, n_sel) float32 or None: mass per block."""

    out: torch.Tensor
    lse: torch.Tensor
    key_mass: torch.Tensor | None
    memory_mass: torch.Tensor | None


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError unless q, k, v follow the shape conventions above."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be 4-d (B, H, T, D); got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, hq, tq, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not match q {tuple(q.shape)}")
    if hq % k.shape[1]:
        raise ValueError(f"query heads {hq} are not a multiple of kv heads {k.shape[1]}")
    if not 0 < tq <= k.shape[2]:
        raise ValueError(f"need 0 < Tq <= Tk, got Tq={tq}, Tk={k.shape[2]}")


def normalize_block_ids(
    block_ids: torch.Tensor, batch: int, n_kv_heads: int, q_len: int, chunk_size: int | None
) -> tuple[torch.Tensor, int]:
    """Bring block ids to (B, Hkv, n_chunks, n_sel) (an expanded view, no copy) and resolve chunk_size.

    Accepts (B, n_sel) (one chunk, all heads), (B, n_chunks, n_sel) (all heads) or
    (B, Hkv, n_chunks, n_sel). chunk_size defaults to ceil(Tq / n_chunks).
    """
    ids = block_ids
    if ids.dim() == 2:
        ids = ids[:, None, None, :]
    elif ids.dim() == 3:
        ids = ids[:, None]
    if ids.dim() != 4 or ids.shape[0] != batch or ids.shape[1] not in (1, n_kv_heads):
        raise ValueError(f"block_ids {tuple(block_ids.shape)} do not fit batch {batch}, kv heads {n_kv_heads}")
    ids = ids.expand(batch, n_kv_heads, ids.shape[2], ids.shape[3])
    n_chunks = ids.shape[2]
    if chunk_size is None:
        chunk_size = -(-q_len // n_chunks)
    if -(-q_len // chunk_size) != n_chunks:
        raise ValueError(f"{n_chunks} chunks of block ids do not cover Tq={q_len} with chunk_size={chunk_size}")
    return ids, chunk_size


def check_pool(pool_k: torch.Tensor, pool_v: torch.Tensor, n_kv_heads: int, head_dim: int) -> None:
    """Raise ValueError unless the pools are (n_blocks, Hkv, block_size, D) and agree."""
    if pool_k.dim() != 4 or pool_k.shape != pool_v.shape:
        raise ValueError(
            f"pools must be (n_blocks, Hkv, block_size, D); got {tuple(pool_k.shape)}, {tuple(pool_v.shape)}"
        )
    if pool_k.shape[1] != n_kv_heads or pool_k.shape[3] != head_dim:
        raise ValueError(f"pool {tuple(pool_k.shape)} does not match Hkv={n_kv_heads}, D={head_dim}")

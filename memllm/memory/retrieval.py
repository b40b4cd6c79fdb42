"""How a query chunk asks memory for blocks, and how blocks choose their representative keys.

Both sides live in one space: per-token vectors that concatenate the kv heads (Hkv*D). A query
vector sums the pre-RoPE queries of each GQA group; a representative is one token's pre-RoPE keys
for all kv heads. Their inner product is the sum of that token's attention logits over all query
heads (times sqrt(D)).
"""

from __future__ import annotations

import torch


def group_sum_queries(q: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """q (Hq, T, D) pre-RoPE -> (T, Hkv*D): per token, the sum of each GQA group's queries."""
    hq, t, d = q.shape
    grouped = q.float().view(n_kv_heads, hq // n_kv_heads, t, d).sum(dim=1)  # (Hkv, T, D)
    return grouped.permute(1, 0, 2).reshape(t, n_kv_heads * d)


def search_vectors(q: torch.Tensor, n_kv_heads: int, strategy: str, last_n: int = 16) -> torch.Tensor:
    """The vectors a chunk searches memory with.

    q: (Hq, T, D) pre-RoPE queries of the chunk (batch row 0). Returns (n, Hkv*D) float32.
    strategy:
      ``mean``       one vector: the chunk's mean query (InfLLM).
      ``last``       one vector: the mean of the last ``last_n`` tokens' queries (the asking tokens).
      ``mean+last``  both of the above (their results are merged).
    """
    per_token = group_sum_queries(q, n_kv_heads)  # (T, Hkv*D)
    mean = per_token.mean(dim=0, keepdim=True)
    last = per_token[-last_n:].mean(dim=0, keepdim=True)
    if strategy == "mean":
        return mean
    if strategy == "last":
        return last
    if strategy == "mean+last":
        return torch.cat([mean, last])
    raise ValueError(f"unknown retrieval strategy {strategy!r} (mean, last, mean+last)")


def choose_representatives(keys: torch.Tensor, mass: torch.Tensor, count: int) -> torch.Tensor:
    """Pick a block's representative vectors.

    keys: (Hkv, n, D) pre-RoPE keys of the block's tokens at one layer; mass: (Hkv, n) attention
    each token drew while in the local window. Returns (min(count, n), Hkv*D) float32: the keys of
    the tokens that drew the most attention, summed over heads (InfLLM's choice).
    """
    hkv, n, d = keys.shape
    top = torch.topk(mass.sum(dim=0), k=min(count, n)).indices  # (R,)
    return keys[:, top, :].float().permute(1, 0, 2).reshape(len(top), hkv * d)

"""How a query chunk asks memory for blocks, and how blocks choose their representative keys.

Both sides live in one space: per-token vectors that concatenate the kv heads (Hkv*D). A query
vector sums the pre-RoPE queries of each GQA group; a representative is one token's pre-RoPE keys
for all kv heads. Their inner product is the sum of that token's attention logits over all query
heads (times sqrt(D)).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

STRATEGIES = ("mean", "last", "mean+last", "heads")


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
    The ``heads`` strategy (per head, per asking token, z-scored) uses :func:`per_head_rows`.
    """
    if strategy not in ("mean", "last", "mean+last"):
        raise ValueError(f"unknown retrieval strategy {strategy!r} (mean, last, mean+last; heads is per-head)")
    if strategy == "mean":  # the group sum of the mean query: T times fewer sums (every layer searches)
        return group_sum_queries(q.float().mean(dim=1, keepdim=True), n_kv_heads)
    per_token = group_sum_queries(q, n_kv_heads)  # (T, Hkv*D)
    last = per_token[-last_n:].mean(dim=0, keepdim=True)
    if strategy == "last":
        return last
    return torch.cat([per_token.mean(dim=0, keepdim=True), last])


REPRESENTATIVE_CHOICES = ("mass", "distinct", "mass+distinct")


def distinct_tokens(keys: torch.Tensor, count: int, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """The ``count`` tokens of a block whose keys lie farthest from the block's mean key.

    keys: (Hkv, n, D) pre-RoPE keys of the block's tokens at one layer. A token's distance is the
    sum over kv heads of its squared distance to that head's mean key, each head's in units of that
    head's mean squared distance, so that every head counts alike. Tokens in ``exclude`` (indices)
    are not chosen. Returns indices (min(count, n - excluded),) int64, farthest first.
    """
    k = keys.float()
    sq = (k - k.mean(dim=1, keepdim=True)).pow(2).sum(dim=-1)  # (Hkv, n)
    distance = (sq / sq.mean(dim=1, keepdim=True).clamp_min(1e-12)).sum(dim=0)  # (n,)
    if exclude is not None and exclude.numel():
        distance[exclude] = float("-inf")
        count = min(count, k.shape[1] - exclude.numel())
    return torch.topk(distance, k=min(count, k.shape[1])).indices


def choose_representatives(keys: torch.Tensor, mass: torch.Tensor, count: int, choice: str = "mass") -> torch.Tensor:
    """Pick a block's representative vectors.

    keys: (Hkv, n, D) pre-RoPE keys of the block's tokens at one layer; mass: (Hkv, n) attention
    each token drew while in the local window. Returns (min(count, n), Hkv*D) float32, the chosen
    tokens' keys with the kv heads concatenated. ``choice``:
      ``mass``           the tokens that drew the most attention, summed over heads (InfLLM's choice);
      ``distinct``       the tokens whose keys lie farthest from the block's mean (:func:`distinct_tokens`):
                         what sets the block apart from text like it, e.g. a needle in repeated filler;
      ``mass+distinct``  half (rounded up) by mass, the rest the most distinct of the other tokens.
    """
    if choice not in REPRESENTATIVE_CHOICES:
        raise ValueError(f"unknown representative choice {choice!r}; choose one of {REPRESENTATIVE_CHOICES}")
    hkv, n, d = keys.shape
    count = min(count, n)
    n_mass = {"mass": count, "distinct": 0, "mass+distinct": (count + 1) // 2}[choice]
    top = torch.topk(mass.sum(dim=0), k=n_mass).indices  # (n_mass,)
    if count > n_mass:
        top = torch.cat([top, distinct_tokens(keys, count - n_mass, exclude=top)])
    return keys[:, top, :].float().permute(1, 0, 2).reshape(len(top), hkv * d)


def per_head_rows(q: torch.Tensor, n_kv_heads: int, last_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One search row per (asking token, query head), for per-head scoring in the concatenated index.

    q: (Hq, T, D) pre-RoPE. The asking tokens are the last ``last_n`` tokens. Row r holds query
    head h's vector in kv head g = h // G's slot and zeros elsewhere, so its inner product with a
    representative is exactly that head's (unrotated) logit against the representative's kv head.
    Returns rows (n, Hkv*D) float32, kv head of each row (n,), and the row's query (n, D).
    """
    hq, _, d = q.shape
    groups = hq // n_kv_heads
    asking = q[:, -last_n:].float()  # (Hq, n_t, D)
    n_t = asking.shape[1]
    heads = torch.arange(hq).repeat_interleave(n_t)  # (Hq*n_t,)
    kv = heads // groups
    vectors = asking.reshape(hq * n_t, d)
    rows = torch.zeros(hq * n_t, n_kv_heads * d)
    for g in range(n_kv_heads):
        sel = kv == g
        rows[sel, g * d : (g + 1) * d] = vectors[sel]
    return rows, kv, vectors


def key_statistics(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (Hkv, D) and covariance (Hkv, D, D) of pre-RoPE keys (Hkv, N, D), float32."""
    k = keys.float()
    mean = k.mean(dim=1)
    centred = k - mean.unsqueeze(1)
    cov = centred.transpose(1, 2) @ centred / max(1, k.shape[1] - 1)
    return mean, cov


def zscores(
    scores: torch.Tensor, queries: torch.Tensor, kv: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor
) -> torch.Tensor:
    """Standardise each row's logits by the distribution of logits over typical keys.

    For query q and keys k with mean mu and covariance S, q.k has mean q.mu and variance q^T S q;
    z = (q.k - q.mu) / sqrt(q^T S q). Per row this is a monotone map (a row's own ranking is
    unchanged), but it puts heads and tokens with very different logit scales on one footing, so
    the max over rows is not dominated by the heads with the largest logits.
    scores (n, k); queries (n, D); kv (n,) kv head of each row; mean (Hkv, D); cov (Hkv, D, D).
    """
    mu = (queries * mean[kv]).sum(-1, keepdim=True)  # (n, 1)
    var = torch.einsum("nd,nde,ne->n", queries, cov[kv], queries).clamp_min(1e-6).unsqueeze(-1)
    return (scores - mu) / var.sqrt()


def parse_heads(spec: str) -> list[tuple[int, int]]:
    """ "18:7,20:6" -> [(18, 7), (20, 6)]: (layer, query head) pairs."""
    heads = []
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        layer, sep, head = part.partition(":")
        if not sep or not layer.strip().isdigit() or not head.strip().isdigit():
            raise ValueError(f"{part!r}: a head is LAYER:HEAD, e.g. 18:7")
        heads.append((int(layer), int(head)))
    if not heads:
        raise ValueError("no heads given (LAYER:HEAD,...)")
    return heads


def format_heads(heads: list[tuple[int, int]]) -> str:
    return ",".join(f"{layer}:{head}" for layer, head in heads)


def every_token_scores(
    keys: torch.Tensor,
    lengths: torch.Tensor,
    vectors: torch.Tensor,
    kv: torch.Tensor,
    mean: torch.Tensor,
    cov: torch.Tensor,
) -> torch.Tensor:
    """(rows, n_blocks): each row's best z-scored logit over every token of each block (an exact
    search over the stored keys, not only the representatives).

    keys (n_blocks, Hkv, bs, D) float32 pre-RoPE; lengths (n_blocks,); vectors (rows, D) the asking
    queries and kv (rows,) their kv heads (:func:`per_head_rows`); mean, cov as :func:`key_statistics`.
    """
    n, hkv, bs, d = keys.shape
    invalid = torch.arange(bs)[None, :] >= lengths[:, None]  # (n, bs)
    best = torch.full((len(vectors), n), float("-inf"))
    for g in range(hkv):
        sel = kv == g
        if not bool(sel.any()):
            continue
        rows = vectors[sel]  # (r, D)
        logits = rows @ keys[:, g].reshape(n * bs, d).T  # (r, n*bs)
        z = zscores(logits, rows, kv[sel], mean, cov).view(-1, n, bs).masked_fill(invalid, float("-inf"))
        best[sel] = z.amax(dim=2)
    return best


def sum_head_scores(head_rows: dict[int, torch.Tensor], heads: Iterable[tuple[int, int]], n_t: int) -> torch.Tensor:
    """(n_blocks,): per block, the sum over (layer, query head) pairs of that head's best score over
    its ``n_t`` asking tokens. head_rows[layer]: (Hq * n_t, n_blocks) scores, rows ordered as
    :func:`per_head_rows` orders them (head h's tokens at rows h * n_t on)."""
    return sum(head_rows[layer][head * n_t : (head + 1) * n_t].amax(dim=0) for layer, head in heads)


def consensus_blocks(ranked: Iterable[np.ndarray], count: int) -> np.ndarray:
    """The ``count`` blocks several searches agree on (reciprocal-rank voting).

    ranked: per search (e.g. per layer), distinct block ids best first; the block at rank r gets
    1/(1+r) votes from that search. Returns up to ``count`` ids, most votes first (ties: the block
    seen first). One search that ranks a block first outweighs many that rank it low.
    """
    votes: dict[int, float] = {}
    for ids in ranked:
        for rank, block in enumerate(np.asarray(ids).tolist()):
            votes[block] = votes.get(block, 0.0) + 1.0 / (1 + rank)
    best = sorted(votes, key=lambda b: -votes[b])[:count]  # sorted is stable: ties keep first appearance
    return np.array(best, dtype=np.int64)

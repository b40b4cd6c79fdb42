"""``memllm bench needle-rank``: where the needle block ranks at each layer, per retrieval scoring.

Reads one passkey prompt through the engine in memory mode, keeps the pre-RoPE queries of the last
prompt chunk (forward hooks on the fused QKV projections), and ranks every memory block for each
layer under each scoring (``mean``, ``last``, ``heads``): the offline check of retrieval that
explains an end-to-end pass or failure without generating anything. A last row, ``heads, every
token``, ranks the blocks as ``heads`` would if every token of every block were a representative
(searched exactly over the stored keys): where it finds the needle and ``heads`` does not, the
block's representatives, not the question, are what missed it. With ``--heads``, one more row: the
needle's rank in a single ranking for every layer, summed from a few retrieval heads' exact scores.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from memllm.bench.common import format_table
from memllm.bench.passkey import build_prompt, trial_offset
from memllm.engine import Engine
from memllm.memory.retrieval import (
    every_token_scores,
    key_statistics,
    per_head_rows,
    search_vectors,
    sum_head_scores,
    zscores,
)

SCORINGS = ("mean", "last", "heads")
EVERY_TOKEN = "heads, every token"
SHARED = "retrieval heads, shared"


@contextmanager
def last_qkv_outputs(engine: Engine) -> Iterator[dict[int, torch.Tensor]]:
    """While open, layer -> the fused QKV projection's output (B, T, (Hq + 2 Hkv) * D), pre-RoPE, of
    that layer's latest forward (forward hooks, removed on exit)."""
    outputs: dict[int, torch.Tensor] = {}
    hooks = [
        layer.attention.wqkv.register_forward_hook(lambda m, i, o, idx=idx: outputs.__setitem__(idx, o.detach()))
        for idx, layer in enumerate(engine.model.layers)
    ]
    try:
        yield outputs
    finally:
        for h in hooks:
            h.remove()


def _best_per_block(scores: np.ndarray, ids: np.ndarray) -> dict[int, float]:
    best: dict[int, float] = {}
    for s, i in zip(scores.ravel().tolist(), ids.ravel().tolist(), strict=True):
        if i >= 0 and s > best.get(i, -np.inf):
            best[i] = s
    return best


def _rank(best: dict[int, float], needle: set[int]) -> int:
    """The needle's rank (0 = first) among the blocks, best score first; ties keep block order."""
    order = sorted(best, key=lambda i: -best[i])
    return min(order.index(b) for b in needle)


def _shared_rank(
    layer_scores: dict[int, torch.Tensor], heads: list[tuple[int, int]], n_t: int, needle: set[int]
) -> int:
    """The needle's rank when every block scores the sum, over the (layer, query head) pairs, of
    that head's best z-scored logit over the asking tokens (rows ``head * n_t`` on, as
    :func:`per_head_rows` orders them) and every token of the block: one ranking for every layer."""
    total = sum_head_scores(layer_scores, heads, n_t)
    return _rank(dict(enumerate(total.tolist())), needle)


@torch.inference_mode()
def needle_ranks(
    engine: Engine,
    length: int,
    depth: float,
    filler: str,
    key: int = 51234,
    trial: int = 0,
    heads: list[tuple[int, int]] | None = None,
) -> list[dict]:
    """One row per scoring: rank of the needle block at every layer, and the layers where it is
    within the top-k that the question retrieves there (``final_top_k``; ``top_k``, or
    ``layer_top_k`` where set, when that is 0). The ranks are those of the question's own queries
    (its real read, after any ``final_consensus`` vote). ``trial``: the filler of
    that trial of ``memllm bench passkey`` (with its key, the same prompt). ``heads``: (layer, query
    head) pairs (``memllm bench retrieval-heads``); a last row, ``SHARED``, gives the needle's rank
    in the one ranking their summed every-token scores make (:func:`_shared_rank`)."""
    cfg = engine.model.config
    for layer, head in heads or ():
        if not (0 <= layer < cfg.n_layers and 0 <= head < cfg.n_heads):
            raise ValueError(f"head {layer}:{head} is outside the model ({cfg.n_layers} layers, {cfg.n_heads} heads)")
    prompt = build_prompt(engine, length, depth, key, filler, offset=trial_offset(trial))
    with last_qkv_outputs(engine) as last_qkv:
        state = engine.new_state("memory")
        engine.prefill(state, prompt.ids)
    source = state.sink
    n = source.num_blocks()
    spans = source.spans(np.arange(n))
    needle = {i for i, (s, e) in enumerate(spans.tolist()) if s < prompt.needle_span[1] and e > prompt.needle_span[0]}
    if not needle:
        raise ValueError("the needle is still in the local window: use a longer prompt or a smaller depth")
    every_token: dict[int, torch.Tensor] = {}  # layer -> (rows, n) of the exact search
    rows = []
    for scoring in (*SCORINGS, EVERY_TOKEN):
        ranks = []
        for layer in range(cfg.n_layers):
            qkv = last_qkv[layer][0]  # (T, (Hq + 2 Hkv) * D)
            q = qkv[:, : cfg.n_heads * cfg.head_dim].reshape(-1, cfg.n_heads, cfg.head_dim).transpose(0, 1)
            if scoring in ("heads", EVERY_TOKEN):
                search, kv, vectors = per_head_rows(q, cfg.n_kv_heads, state.mem.asking_tokens)
                mean, cov = key_statistics(state.buf.raw[layer, 0, :, : state.buf.length])
            if scoring == "heads":
                scores, ids = source.search(layer, search.numpy(), n)
                scores = zscores(torch.from_numpy(scores), vectors, kv, mean, cov).numpy()
                best = _best_per_block(scores, ids)
            elif scoring == EVERY_TOKEN:
                blocks = source.fetch(layer, np.arange(n))
                keys = torch.from_numpy(blocks.keys).float()
                every_token[layer] = every_token_scores(keys, torch.from_numpy(blocks.lengths), vectors, kv, mean, cov)
                best = dict(enumerate(every_token[layer].amax(dim=0).tolist()))
            else:
                scores, ids = source.search(layer, search_vectors(q, cfg.n_kv_heads, scoring).numpy(), n)
                best = _best_per_block(scores, ids)
            ranks.append(_rank(best, needle))
        rows.append(
            {
                "scoring": scoring,
                "blocks": n,
                "layers_within_top_k": sum(r < k for r, k in zip(ranks, state.question_top_k, strict=True)),
                "ranks": " ".join(map(str, ranks)),
            }
        )
    if heads:
        n_t = min(state.mem.asking_tokens, last_qkv[0].shape[1])
        shared = _shared_rank(every_token, heads, n_t, needle)
        rows.append({"scoring": SHARED, "blocks": n, "layers_within_top_k": "-", "ranks": str(shared)})
    return rows


def print_rows(rows: list[dict]) -> None:
    print(format_table(rows))

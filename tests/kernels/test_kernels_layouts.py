"""Block layouts agree exactly with the dense token rule; random blocks are seeded and causal."""

from __future__ import annotations

import pytest
import torch

from memllm_kernels import patterns as P
from memllm_kernels.layouts import build_layout_uncached
from memllm_kernels.patterns import random_table, token_mask

PATTERNS = [
    P.full(),
    P.sliding_window(1),
    P.sliding_window(7),
    P.sliding_window(32),
    P.sinks_window(3, 9),
    P.longformer(8, 20),
    P.bigbird(8, 4, 2, random_block=8, seed=3),
    P.bigbird(16, 0, 3, random_block=5, seed=1),
    P.strided(1),
    P.strided(6),
    P.strided(16),
    P.fixed(8, 2),
    P.fixed(7, 3),
    P.fixed(16, 16),
    P.Pattern("fixed", stride=10, summary=1, n_global=5),
    P.Pattern("strided", stride=5, n_global=3, n_random=1, random_block=4, seed=9),
]
SHAPES = [(1, 1), (37, 37), (64, 64), (20, 77), (1, 50), (100, 100)]
TILES = [(4, 4), (8, 16), (16, 8), (5, 7), (64, 64)]


def _tiles_of(mask: torch.Tensor, bq: int, bk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(any, all) per tile of a dense mask, ragged edges counted only over in-bound pairs."""
    tq, tk = mask.shape
    nqb, nkb = -(-tq // bq), -(-tk // bk)
    padded = torch.zeros(nqb * bq, nkb * bk, dtype=torch.int64)
    inb = torch.zeros_like(padded)
    padded[:tq, :tk] = mask.long()
    inb[:tq, :tk] = 1
    s = padded.view(nqb, bq, nkb, bk).sum((1, 3))
    n = inb.view(nqb, bq, nkb, bk).sum((1, 3))
    return s > 0, s == n


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("tiles", TILES, ids=str)
def test_layout_matches_token_rule(pattern: P.Pattern, shape: tuple[int, int], tiles: tuple[int, int]) -> None:
    tq, tk = shape
    bq, bk = tiles
    lay = build_layout_uncached(pattern, tq, tk, bq, bk)
    dense = token_mask(pattern, tq, tk)
    want_any, want_all = _tiles_of(dense, bq, bk)
    assert torch.equal(lay.any_, want_any), "visited tiles must be exactly the tiles holding a visible pair"
    assert not (lay.full & ~want_all).any(), "a tile marked full must be fully visible"
    # full is what it can be for the simple local rules (window / causal tiles are exact)
    if pattern.kind in ("full", "window") and not pattern.n_global and not pattern.n_random:
        assert torch.equal(lay.full, want_all & want_any)
    # CSR / CSC lists hold the same tiles
    for qb in range(lay.n_q_blocks):
        n = int(lay.kv_count[qb])
        cols = lay.kv_blocks[qb, :n].tolist()
        assert cols == torch.nonzero(want_any[qb]).flatten().tolist()
        assert lay.kv_full[qb, :n].tolist() == lay.full[qb, cols].int().tolist()
    for kb in range(lay.n_k_blocks):
        n = int(lay.q_count[kb])
        assert lay.q_blocks[kb, :n].tolist() == torch.nonzero(want_any[:, kb]).flatten().tolist()


def test_every_query_sees_itself() -> None:
    for pattern in PATTERNS:
        m = token_mask(pattern, 40, 90)
        assert m[torch.arange(40), torch.arange(50, 90)].all(), pattern.name
        assert not torch.triu(token_mask(pattern, 60, 60), diagonal=1).any(), f"{pattern.name} is not causal"


def test_window_rule_by_hand() -> None:
    m = token_mask(P.sinks_window(2, 3), 6, 6)
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 1, 0],
            [1, 1, 0, 1, 1, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(m, want)


def test_strided_and_fixed_rules_by_hand() -> None:
    s = token_mask(P.strided(3), 8, 8)
    assert s[7].nonzero().flatten().tolist() == [1, 4, 5, 6, 7]
    f = token_mask(P.fixed(4, 1), 10, 10)
    # query 9: own segment [8, 9] + summary keys 3, 7
    assert f[9].nonzero().flatten().tolist() == [3, 7, 8, 9]


def test_random_blocks_are_seeded_prefix_stable_and_early() -> None:
    pat = P.bigbird(8, 4, 3, random_block=8, seed=5)
    short, long = random_table(pat, 200), random_table(pat, 400)
    assert torch.equal(long[: short.shape[0]], short), "a longer sequence must extend the table"
    assert torch.equal(random_table(pat, 400), long)
    other = random_table(P.bigbird(8, 4, 3, random_block=8, seed=6), 400)
    assert not torch.equal(other, long), "different seeds must draw different blocks"
    rows = torch.arange(long.shape[0]).unsqueeze(1)
    assert ((long < rows) | (long == -1)).all(), "random blocks must lie strictly before the query block"
    assert (long[10:] >= 0).all(), "late blocks have enough candidates for every draw"
    # distinct per row
    for row in long.tolist():
        ids = [i for i in row if i >= 0]
        assert len(ids) == len(set(ids))

"""Paired comparison of two systems scored on the same questions: mean difference, a percentile
bootstrap interval over questions, wins and losses.

Two modes of one evaluation run answer the same questions, so their per-question differences are
what varies; resampling those (not each mode's scores apart) gives the interval of the difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class PairedDifference:
    """``mean`` of ``a - b`` over ``n`` questions, its ``level`` interval ``[low, high]``, and how many
    questions ``a`` scored above (``wins``) and below (``losses``) ``b``."""

    n: int
    mean: float
    low: float
    high: float
    wins: int
    losses: int

    @property
    def separated(self) -> bool:
        """The interval excludes 0: the sign of the difference is not resampling noise."""
        return self.low > 0 or self.high < 0


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    *,
    resamples: int = RESAMPLES,
    level: float = LEVEL,
    seed: int = 0,
    batch: int = 1000,
) -> PairedDifference:
    """Bootstrap the mean of ``a[i] - b[i]`` (same questions, same order; at least one).

    Questions are drawn with replacement ``resamples`` times (in batches of ``batch`` resamples, to
    bound memory at ``batch * n`` indices); the interval is the percentile interval of the means.
    Deterministic for a given ``seed``."""
    if len(a) != len(b):
        raise ValueError(f"paired scores differ in length: {len(a)} vs {len(b)}")
    if not len(a):
        raise ValueError("no questions to compare")
    diff = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(diff)
    rng = np.random.default_rng(seed)
    sizes = [min(batch, resamples - done) for done in range(0, resamples, batch)]
    means = np.concatenate([diff[rng.integers(0, n, size=(k, n))].mean(axis=1) for k in sizes])
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedDifference(
        n=n,
        mean=float(diff.mean()),
        low=float(low),
        high=float(high),
        wins=int((diff > 0).sum()),
        losses=int((diff < 0).sum()),
    )

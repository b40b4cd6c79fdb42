"""Paired bootstrap of the per-question differences between two modes of one run."""

from __future__ import annotations

import numpy as np
import pytest

from memllm.evals.paired import paired_bootstrap


def test_identical_scores_give_a_zero_interval_and_no_wins():
    d = paired_bootstrap([0.2, 0.5, 1.0], [0.2, 0.5, 1.0], resamples=200)
    assert (d.mean, d.low, d.high, d.wins, d.losses, d.n) == (0.0, 0.0, 0.0, 0, 0, 3)
    assert not d.separated


def test_a_constant_shift_is_its_own_interval():
    d = paired_bootstrap([1.0, 1.0, 0.5], [0.5, 0.5, 0.0], resamples=200)
    assert d.mean == pytest.approx(0.5) and d.low == pytest.approx(0.5) and d.high == pytest.approx(0.5)
    assert (d.wins, d.losses) == (3, 0) and d.separated


def test_interval_matches_the_normal_approximation_and_is_reproducible():
    rng = np.random.default_rng(7)
    b = rng.uniform(size=900)
    a = b + rng.normal(0.1, 0.6, size=900)
    d = paired_bootstrap(a, b, seed=3)
    diff = a - b
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))
    assert d.mean == pytest.approx(diff.mean())
    assert d.low == pytest.approx(diff.mean() - half, abs=0.2 * half)
    assert d.high == pytest.approx(diff.mean() + half, abs=0.2 * half)
    assert d == paired_bootstrap(a, b, seed=3), "same seed, same interval"
    assert d.wins + d.losses == 900 and d.separated


def test_batches_do_not_change_the_resample_count():
    small = paired_bootstrap([1.0, 0.0, 0.0, 1.0], [0.0] * 4, resamples=1001, batch=100, seed=1)
    assert 0.0 <= small.low <= small.mean <= small.high <= 1.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="differ in length"):
        paired_bootstrap([1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="no questions"):
        paired_bootstrap([], [])

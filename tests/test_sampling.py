from __future__ import annotations

import pytest
import torch

from memllm.sampling import (
    SamplingParams,
    apply_logit_bias,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    only_tokens_bias,
    sample,
)


def test_greedy_picks_argmax():
    logits = torch.tensor([0.1, 3.0, 2.0])
    assert sample(logits, SamplingParams(temperature=0)) == 1


def test_top_k_keeps_k_largest():
    out = apply_top_k(torch.tensor([1.0, 5.0, 3.0, 4.0]), 2)
    assert torch.isinf(out[[0, 2]]).all() and torch.isfinite(out[[1, 3]]).all()


def test_top_p_keeps_smallest_nucleus():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = torch.isfinite(apply_top_p(logits, 0.75))
    assert kept.tolist() == [True, True, False, False]
    assert torch.isfinite(apply_top_p(logits, 0.5)).tolist() == [True, False, False, False]


def test_repetition_penalty_discourages_seen_tokens():
    logits = torch.tensor([2.0, -1.0, 2.0])
    out = apply_repetition_penalty(logits, [0, 1], 2.0)
    assert out.tolist() == [1.0, -2.0, 2.0]


def test_seed_makes_sampling_reproducible():
    logits = torch.randn(1000)
    p = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=7)
    a = [sample(logits, p, generator=g) for g in [p.generator()] for _ in range(20)]
    b = [sample(logits, p, generator=g) for g in [p.generator()] for _ in range(20)]
    assert a == b and len(set(a)) > 1


def test_sampled_tokens_stay_inside_top_k():
    logits = torch.randn(100)
    allowed = set(torch.topk(logits, 3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    assert {sample(logits, SamplingParams(temperature=2.0, top_k=3), generator=g) for _ in range(200)} <= allowed


def test_logit_bias_adds_offsets_and_repeated_ids_add_up():
    out = apply_logit_bias(torch.tensor([1.0, 2.0, 3.0]), [(0, 5.0), (2, -1.0), (0, 0.5)])
    assert out.tolist() == [6.5, 2.0, 2.0]
    with pytest.raises(IndexError, match="outside the vocabulary"):
        apply_logit_bias(torch.zeros(3), [(3, 1.0)])


def test_only_tokens_bias_restricts_greedy_and_sampled_choice():
    logits = torch.tensor([9.0, 1.0, 8.0, 2.0, 7.0])
    choice = SamplingParams(temperature=0, logit_bias=only_tokens_bias([3, 1, 3]))
    assert sample(logits, choice) == 3  # the best of the allowed ids, not the overall argmax
    sampled = SamplingParams(temperature=1.0, logit_bias=only_tokens_bias([1, 3]), seed=0)
    g = sampled.generator()
    assert {sample(logits, sampled, generator=g) for _ in range(200)} == {1, 3}


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1},
        {"top_p": 0},
        {"top_k": -1},
        {"max_tokens": -2},
        {"logit_bias": ((1, 100.5),)},
        {"logit_bias": ((-1, 1.0),)},
    ],
)
def test_bad_params_are_rejected(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_tiny_temperatures_are_greedy_not_nan():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    for t in (1e-300, 1e-30, 1e-6):
        assert sample(logits, SamplingParams(temperature=t, top_p=1e-300)) == 1


def test_tiny_top_p_keeps_the_most_likely_token():
    torch.manual_seed(0)
    logits = torch.randn(50_000) * 4
    for p in (1e-68, 1e-9):
        assert sample(logits, SamplingParams(temperature=1.0, top_p=p)) == int(torch.argmax(logits))

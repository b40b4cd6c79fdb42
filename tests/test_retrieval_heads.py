"""``memllm bench retrieval-heads`` and the shared row of ``bench needle-rank --heads``: the needle
share of each head against transformers' own attention weights, and the shared ranking against a
plain recomputation from the stored keys (tiny random model, bundled tokenizer)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from memllm.bench.needle_rank import EVERY_TOKEN, SHARED, needle_ranks
from memllm.bench.passkey import QUESTION, build_prompt
from memllm.bench.retrieval_heads import calibrate, needle_attention, top_heads
from memllm.engine import Engine
from memllm.memory.retrieval import format_heads, parse_heads
from memllm.settings import MemorySettings
from memllm.testing import tiny_loaded_model, tiny_transformers_model

SMALL = MemorySettings(sinks=4, window=64, chunk=32, block_size=16, representatives=2, top_k=3, final_top_k=5)


@pytest.fixture(scope="module")
def engine(real_model):
    tok = real_model.tokenizer
    return Engine(dataclasses.replace(tiny_loaded_model(vocab=len(tok)), tokenizer=tok), SMALL)


def test_needle_share_equals_transformers_attention_weights(engine):
    prompt = build_prompt(engine, 300, 0.4, 48880, "grass")
    hf, _ = tiny_transformers_model(vocab=len(engine.tokenizer))
    hf.config._attn_implementation = "eager"  # the eager path returns the softmax weights
    with torch.no_grad():
        weights = hf(torch.tensor([prompt.ids]), output_attentions=True).attentions  # per layer (1, H, T, T)
    n_question = len(engine.encode(QUESTION))
    start, end = prompt.needle_span
    expected = torch.stack([w[0, :, -n_question:, start:end].sum(-1).mean(-1) for w in weights])
    got = needle_attention(engine, prompt)
    assert got.shape == (engine.model.config.n_layers, engine.model.config.n_heads)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    assert float(got.max()) > 0.0


def test_calibration_averages_the_prompts_and_lists_heads_by_share(engine):
    mass = calibrate(engine, 300, "grass", trials=1, depths=(0.3, 0.7))
    assert mass.shape == (engine.model.config.n_layers, engine.model.config.n_heads)
    assert bool(((mass >= 0) & (mass <= 1)).all())
    rows = top_heads(mass, 5)
    shares = [r["needle_mass"] for r in rows]
    assert shares == sorted(shares, reverse=True)
    first = rows[0]
    assert first["needle_mass"] == pytest.approx(float(mass.max()), abs=1e-4)
    assert float(mass[first["layer"], first["head"]]) == pytest.approx(float(mass.max()))


def test_heads_parse_and_format_round_trip():
    assert parse_heads(" 18:7, 20:6 ") == [(18, 7), (20, 6)]
    assert format_heads([(18, 7), (20, 6)]) == "18:7,20:6"
    for bad in ("18", "a:b", "", "18:7,x"):
        with pytest.raises(ValueError):
            parse_heads(bad)


def test_shared_rank_is_the_sum_of_the_heads_every_token_scores(engine):
    """The shared row recomputed by hand: per head, the best z-scored logit over its asking tokens
    and each block's stored keys, summed over the heads; the needle's place in that order."""
    from memllm.bench import needle_rank as nr

    captured = {}
    real = nr.every_token_scores

    def keep(*args):
        out = real(*args)
        captured[len(captured)] = (args, out)
        return out

    nr.every_token_scores = keep
    try:
        heads = [(0, 1), (2, 3)]
        rows = needle_ranks(engine, 600, 0.3, "grass", key=48880, heads=heads)
    finally:
        nr.every_token_scores = real
    assert [r["scoring"] for r in rows][-2:] == [EVERY_TOKEN, SHARED]
    n_blocks = rows[0]["blocks"]
    n_t = SMALL.asking_tokens
    total = torch.zeros(n_blocks)
    for layer, head in heads:
        (keys, lengths, vectors, kv, mean, cov), _ = captured[layer]
        q = vectors[head * n_t : (head + 1) * n_t]  # this head's asking tokens
        g = head // (engine.model.config.n_heads // engine.model.config.n_kv_heads)
        assert bool((kv[head * n_t : (head + 1) * n_t] == g).all())
        per_block = []
        for b in range(n_blocks):
            k = keys[b, g, : int(lengths[b])]  # (len, D)
            logits = q @ k.T
            mu = q @ mean[g]
            sd = torch.einsum("td,de,te->t", q, cov[g], q).clamp_min(1e-6).sqrt()
            per_block.append(float(((logits - mu[:, None]) / sd[:, None]).max()))
        total += torch.tensor(per_block)
    prompt = build_prompt(engine, 600, 0.3, 48880, "grass")
    state = engine.new_state("memory")
    engine.prefill(state, prompt.ids)
    spans = state.sink.spans(np.arange(n_blocks)).tolist()
    needle = [i for i, (s, e) in enumerate(spans) if s < prompt.needle_span[1] and e > prompt.needle_span[0]]
    order = total.argsort(descending=True, stable=True).tolist()
    assert rows[-1]["ranks"] == str(min(order.index(b) for b in needle))


def test_heads_outside_the_model_are_refused(engine):
    with pytest.raises(ValueError, match="outside the model"):
        needle_ranks(engine, 600, 0.3, "grass", key=48880, heads=[(99, 0)])


def test_the_bundled_models_calibrated_heads_fit_it(real_model):
    """``question_heads=auto`` on the bundled model: its calibrated heads, every one a memory layer's."""
    from memllm.loading import RETRIEVAL_HEADS

    state = Engine(real_model, MemorySettings(question_heads="auto")).new_state("memory")
    heads = parse_heads(RETRIEVAL_HEADS[real_model.name])
    assert state.mem.question_heads == RETRIEVAL_HEADS[real_model.name]
    assert sorted((layer, h) for layer, hs in state._question_heads.items() for h in hs) == sorted(heads)

"""``memllm bench needle-rank``: the needle block's rank per layer and scoring, on a tiny random
model with the bundled tokenizer (the ranks mean nothing here; their bookkeeping is what is tested)."""

from __future__ import annotations

import dataclasses

import pytest

from memllm.bench.needle_rank import EVERY_TOKEN, SCORINGS, needle_ranks
from memllm.engine import Engine
from memllm.settings import MemorySettings
from memllm.testing import tiny_loaded_model

# the question retrieves 5 blocks per layer, the other chunks 3 (of ~33)
SMALL = MemorySettings(sinks=4, window=64, chunk=32, block_size=16, representatives=2, top_k=3, final_top_k=5)


@pytest.fixture(scope="module")
def engine(real_model):
    tok = real_model.tokenizer
    return Engine(dataclasses.replace(tiny_loaded_model(vocab=len(tok)), tokenizer=tok), SMALL)


@pytest.mark.parametrize("trial", [0, 1])
def test_ranks_every_layer_under_every_scoring(engine, trial):
    rows = needle_ranks(engine, 600, 0.3, "grass", key=48880, trial=trial)
    assert [r["scoring"] for r in rows] == [*SCORINGS, EVERY_TOKEN]
    blocks = rows[0]["blocks"]
    assert blocks >= (600 - SMALL.sinks - SMALL.window) // SMALL.block_size - 1
    for row in rows:
        ranks = [int(r) for r in row["ranks"].split()]
        assert len(ranks) == engine.model.config.n_layers
        assert all(0 <= r < blocks for r in ranks)
        assert row["layers_within_top_k"] == sum(r < SMALL.final_top_k for r in ranks)


def test_a_needle_still_in_the_window_is_reported(engine):
    with pytest.raises(ValueError, match="local window"):
        needle_ranks(engine, 600, 1.0, "grass", key=48880)


def test_every_token_row_equals_heads_when_every_token_is_a_representative(real_model):
    """The exact search over stored keys is the FAISS search when a block's representatives are all
    its tokens (the same logits, z-scored alike): the two rows must rank the needle alike."""
    tok = real_model.tokenizer
    every = dataclasses.replace(SMALL, representatives=SMALL.block_size)
    engine = Engine(dataclasses.replace(tiny_loaded_model(vocab=len(tok)), tokenizer=tok), every)
    rows = {r["scoring"]: r["ranks"] for r in needle_ranks(engine, 600, 0.3, "grass", key=48880)}
    assert rows[EVERY_TOKEN] == rows["heads"]

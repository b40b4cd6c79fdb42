"""``final_consensus``: the question's forward first votes (each memory layer's ranked blocks), then
reads with the most voted blocks added to every memory layer's own."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from serving_helpers import SMALL, prompt, read_in_scheduler, tiny_engine

from memllm.attention import READ_LAST, StreamingAttention
from memllm.memory.retrieval import consensus_blocks
from memllm.settings import MemorySettings, Settings

# the question retrieves 3 of the prompt's ~10 blocks per layer, so layers disagree
NARROW = dataclasses.replace(SMALL, final_top_k=3, final_consensus=0)


def test_consensus_blocks_count_reciprocal_rank_votes():
    # 5: 1 + 1/2; 1: 1/2 + 1 + 1; 2: 1/3
    assert consensus_blocks([np.array([5, 1, 2]), np.array([1, 5]), np.array([1])], 2).tolist() == [1, 5]
    # 6 (first twice: 2) beats 7 (first once, second once: 1.5) and 9 (third three times: 1)
    assert consensus_blocks([np.array([7, 8, 9]), np.array([6, 8, 9]), np.array([6, 7, 9])], 2).tolist() == [6, 7]


def test_consensus_blocks_ties_and_short_lists():
    assert consensus_blocks([np.array([3]), np.array([4])], 2).tolist() == [3, 4]  # a tie: first seen first
    assert consensus_blocks([np.array([2, 1])], 5).tolist() == [2, 1]  # fewer blocks than asked
    assert consensus_blocks([], 3).tolist() == []


def _memory_ids(state) -> dict[int, list[int]]:
    """Each memory layer's blocks of the state's last forward."""
    return {layer: got.ids.tolist() for layer, got in sorted(state._retrieved.items())}


async def _read(engine, ids, reader: str):
    state = engine.new_state("memory", trace=True)
    if reader == "engine":
        engine.prefill(state, ids)
    else:
        await read_in_scheduler(engine, state, ids)
    return state


@pytest.mark.parametrize("reader", ["engine", "scheduler"])
@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_every_layer_attends_to_the_blocks_the_layers_agree_on(tiny, reader, seed, monkeypatch):
    ids = prompt(seed, 100)
    with monkeypatch.context() as m:  # each search's blocks in rank order: no block kept in place
        m.setattr(StreamingAttention, "_gather_blocks", StreamingAttention._fetch_blocks)
        one_pass = await _read(tiny_engine(tiny, NARROW), ids, reader)
    voted = await _read(tiny_engine(tiny, dataclasses.replace(NARROW, final_consensus=2)), ids, reader)
    assert voted.n_tokens == one_pass.n_tokens == 100
    ballots = _memory_ids(one_pass)  # the voting pass reads the question as a one-pass reader does
    assert len(ballots) == tiny.config.n_layers and all(len(b) == 3 for b in ballots.values())
    consensus = consensus_blocks([np.array(b) for b in ballots.values()], 2).tolist()
    got = _memory_ids(voted)
    for layer, blocks in got.items():
        assert set(consensus) <= set(blocks), layer
        assert len(blocks) == len(set(blocks)) <= 3 + 2
    # the first layer reads what the voting pass read, so its own blocks are the one-pass reader's
    first = min(got)
    assert sorted(got[first]) == sorted(ballots[first] + [b for b in consensus if b not in ballots[first]])
    # the guard: somewhere a layer gained a block it did not find itself
    assert any(len(blocks) > 3 for blocks in got.values())


async def test_the_voting_pass_leaves_nothing_behind(tiny):
    """When the consensus adds no block (every layer already retrieves all of them), the two-pass
    question reads exactly as the one-pass one: same logits, buffers, key mass and trace."""
    wide = dataclasses.replace(SMALL, final_top_k=64)
    ids = prompt(3, 100)
    results = []
    for consensus in (0, 4):
        engine = tiny_engine(tiny, dataclasses.replace(wide, final_consensus=consensus))
        state = engine.new_state("memory", trace=True)
        logits = engine.prefill(state, ids)
        results.append((logits, state))
    (l0, s0), (l1, s1) = results
    assert s0.memory.num_blocks() > 4
    assert torch.equal(l0, l1)
    n = s0.buf.length
    assert n == s1.buf.length
    for name in ("raw", "rot", "val", "mass"):
        assert torch.equal(getattr(s0.buf, name)[:, :, :, :n], getattr(s1.buf, name)[:, :, :, :n]), name
    assert s0.trace.retrieved == s1.trace.retrieved
    assert s0.trace.mass == s1.trace.mass


def test_a_negative_final_consensus_is_refused(tiny):
    with pytest.raises(ValueError, match="final_consensus"):
        tiny_engine(tiny, dataclasses.replace(SMALL, final_consensus=-1)).new_state("memory")


HEADS = "2:1,0:3"  # tiny model: 3 layers, 4 query heads over 2 kv heads


def _by_hand_heads_vote(state, ballots: list[np.ndarray], asked: dict, count: int) -> list[int]:
    """The retrieval heads' choice recomputed with explicit loops: per head, the best z-scored logit
    over its asking tokens and each candidate block's stored tokens, summed over the heads."""
    candidates = sorted({int(b) for ballot in ballots for b in ballot.tolist()})
    groups = state.cfg.n_heads // state.cfg.n_kv_heads
    total = {b: 0.0 for b in candidates}
    for layer, head in [(2, 1), (0, 3)]:
        a = asked[layer]
        q = a.vectors[head * a.n_t : (head + 1) * a.n_t]  # (n_t, D) this head's asking tokens
        g = head // groups
        mu = q @ a.mean[g]
        sd = torch.einsum("td,de,te->t", q, a.cov[g], q).clamp_min(1e-6).sqrt()
        blocks = state.memory.fetch(layer, np.array(candidates))
        for j, b in enumerate(candidates):
            k = torch.from_numpy(blocks.keys[j, g, : int(blocks.lengths[j])]).float()
            total[b] += float(((q @ k.T - mu[:, None]) / sd[:, None]).max())
    return sorted(candidates, key=lambda b: (-total[b], b))[:count]


@pytest.mark.parametrize("seed", [0, 1])
async def test_retrieval_heads_choose_the_blocks_their_every_token_scores_rank_first(tiny, seed, monkeypatch):
    from memllm.attention import StreamingAttention

    seen = {}
    real = StreamingAttention._heads_vote

    def spy(self, ballots, count):
        seen.update(state=self, ballots=ballots, asked=dict(self._asked), count=count)
        seen["chosen"] = real(self, ballots, count)
        return seen["chosen"]

    monkeypatch.setattr(StreamingAttention, "_heads_vote", spy)
    mem = dataclasses.replace(NARROW, final_consensus=2, question_heads=HEADS)
    voted = await _read(tiny_engine(tiny, mem), prompt(seed, 100), "engine")
    assert sorted(seen["asked"]) == [0, 2]  # only the heads' layers keep their asking queries
    want = _by_hand_heads_vote(seen["state"], seen["ballots"], seen["asked"], 2)
    assert seen["chosen"].tolist() == want
    for layer, blocks in _memory_ids(voted).items():
        assert set(want) <= set(blocks), layer


async def test_retrieval_heads_and_the_rank_vote_can_disagree(tiny, monkeypatch):
    """Over a few prompts the heads choose other blocks than the reciprocal-rank vote somewhere
    (otherwise the setting would change nothing)."""
    from memllm.attention import StreamingAttention

    differs = []
    real = StreamingAttention._heads_vote

    def spy(self, ballots, count):
        chosen = real(self, ballots, count)
        differs.append(chosen.tolist() != consensus_blocks(ballots, count).tolist())
        return chosen

    monkeypatch.setattr(StreamingAttention, "_heads_vote", spy)
    mem = dataclasses.replace(NARROW, final_consensus=2, question_heads=HEADS)
    for seed in range(4):
        await _read(tiny_engine(tiny, mem), prompt(seed, 100), "engine")
    assert len(differs) == 4 and any(differs)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"question_heads": "2-7"}, "LAYER:HEAD"),
        ({"question_heads": "3:0"}, "outside the model"),
        ({"question_heads": "1:4"}, "outside the model"),
        ({"question_heads": "2:0", "layers": "0,1"}, "does not use memory"),
    ],
)
def test_bad_question_heads_are_refused(tiny, changes, match):
    with pytest.raises(ValueError, match=match):
        tiny_engine(tiny, dataclasses.replace(SMALL, **changes)).new_state("memory")


def test_question_heads_are_ignored_outside_memory_mode(tiny):
    engine = tiny_engine(tiny, dataclasses.replace(SMALL, question_heads="2:1"))
    for mode in ("window", "full"):
        state = engine.new_state(mode)
        assert state._question_heads == {}


def test_auto_question_heads_are_the_loaded_models_own(tiny, monkeypatch):
    """``auto``: the heads calibrated for the loaded model (by its name), the rank vote for others."""
    import memllm.engine

    mem = dataclasses.replace(SMALL, question_heads="auto")
    assert tiny_engine(tiny, mem).new_state("memory")._question_heads == {}
    monkeypatch.setitem(memllm.engine.RETRIEVAL_HEADS, tiny.name, "2:1,0:3,2:0")
    state = tiny_engine(tiny, mem).new_state("memory")
    assert state._question_heads == {2: (1, 0), 0: (3,)}
    assert state.mem.question_heads == "2:1,0:3,2:0"


def test_auto_is_the_default_and_vote_keeps_the_rank_vote(tiny, monkeypatch):
    """The default chooses the question's blocks with the loaded model's heads; ``vote`` (what
    ``MEMLLM_MEMORY_QUESTION_HEADS`` sets, an empty variable being no setting) keeps the rank vote
    even for a model with calibrated heads."""
    import memllm.engine

    assert MemorySettings().question_heads == "auto"
    monkeypatch.setitem(memllm.engine.RETRIEVAL_HEADS, tiny.name, "2:1")
    default = tiny_engine(tiny, dataclasses.replace(SMALL, question_heads=MemorySettings().question_heads))
    assert default.new_state("memory")._question_heads == {2: (1,)}
    env = Settings.from_env({"MEMLLM_MEMORY_QUESTION_HEADS": "vote"}).memory
    state = tiny_engine(tiny, dataclasses.replace(SMALL, question_heads=env.question_heads)).new_state("memory")
    assert state._question_heads == {}
    assert state.mem.question_heads == "vote"


def _by_hand_recall_scores(state, ballots: list[np.ndarray], asked: dict) -> tuple[float, float, int]:
    """(best candidate's total, the best local block's total, that block's first slot) with explicit
    loops: per head, the
    best z-scored logit over its asking tokens and a block's tokens, summed over the heads; the local
    blocks cut every key read before the question but the first token (the attention sink) into
    ``block_size`` pieces."""
    candidates = sorted({int(b) for ballot in ballots for b in ballot.tolist()})
    groups = state.cfg.n_heads // state.cfg.n_kv_heads
    total = {b: 0.0 for b in candidates}
    bs = state.layout.block_size
    starts = range(1, state.buf.length, bs)
    local = dict.fromkeys(starts, 0.0)
    for layer, head in [(2, 1), (0, 3)]:
        a = asked[layer]
        q = a.vectors[head * a.n_t : (head + 1) * a.n_t]
        g = head // groups
        mu = q @ a.mean[g]
        sd = torch.einsum("td,de,te->t", q, a.cov[g], q).clamp_min(1e-6).sqrt()

        def best(k: torch.Tensor, q=q, mu=mu, sd=sd) -> float:
            return float(((q @ k.T - mu[:, None]) / sd[:, None]).max())

        blocks = state.memory.fetch(layer, np.array(candidates))
        for j, b in enumerate(candidates):
            total[b] += best(torch.from_numpy(blocks.keys[j, g, : int(blocks.lengths[j])]).float())
        for start in starts:
            local[start] += best(state.buf.raw[layer, 0, g, start : min(start + bs, state.buf.length)].float())
    best_start = max(local, key=lambda start: (local[start], -start))  # the first of equal totals
    return max(total.values()), local[best_start], best_start


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_the_heads_vote_scores_memory_against_the_local_context(tiny, seed, monkeypatch):
    """``recall_scores``: the retrieval heads' best memory block and best local block (sinks and
    window but the attention sink, cut as memory is), each the summed per-head best z-scored logit."""
    from memllm.attention import StreamingAttention

    seen = {}
    real = StreamingAttention._heads_vote

    def spy(self, ballots, count):
        seen["want"] = _by_hand_recall_scores(self, ballots, dict(self._asked))
        chosen = real(self, ballots, count)
        seen["got"] = self.recall_scores
        seen["block"] = (self._recalled_local, self.buf.length, self.local_start)
        return chosen

    monkeypatch.setattr(StreamingAttention, "_heads_vote", spy)
    mem = dataclasses.replace(NARROW, final_consensus=2, question_heads=HEADS)
    state = await _read(tiny_engine(tiny, mem), prompt(seed, 100), "engine")
    memory, local, start = seen["want"]
    assert seen["got"] == pytest.approx((memory, local), rel=1e-5)
    assert state.recall_scores == seen["got"]  # kept for the answer's decode steps
    block, length, local_start = seen["block"]  # the best local block, for ``recalled_local_bias``
    assert block == (start, min(start + mem.block_size, length), local_start)


async def test_the_attention_sink_does_not_count_as_local_context(tiny, monkeypatch):
    """The first token's keys draw idle attention whatever is asked: making them match every asking
    query leaves the local score as it was."""
    from memllm.attention import StreamingAttention

    scores = []
    real = StreamingAttention._heads_vote

    def spy(self, ballots, count):
        if len(scores) == 1:  # the second read: a first token every asking query matches strongly
            for layer, asked in self._asked.items():
                self.buf.raw[layer, 0, :, 0] = asked.vectors.mean(0).to(self.buf.raw.dtype) * 100
        chosen = real(self, ballots, count)
        scores.append(self.recall_scores)
        return chosen

    monkeypatch.setattr(StreamingAttention, "_heads_vote", spy)
    mem = dataclasses.replace(NARROW, final_consensus=2, question_heads=HEADS)
    for _ in range(2):
        await _read(tiny_engine(tiny, mem), prompt(4, 100), "engine")
    assert scores[0] == scores[1]


def test_the_recalled_bias_is_the_answers_only_where_memory_scored_higher(tiny):
    mem = dataclasses.replace(SMALL, answer_memory_bias=-0.25, recalled_memory_bias=1.5)
    state = tiny_engine(tiny, mem).new_state("memory")
    for scores, want in [(None, -0.25), ((3.0, 2.0), 1.5), ((2.0, 3.0), -0.25), ((2.0, 2.0), -0.25)]:
        state.recall_scores = scores
        assert state.answer_bias() == want
    state.recall_scores = (3.0, 2.0)
    state.reading = READ_LAST
    state.begin(5)  # a new prompt's forward: the last question's scores no longer hold
    assert state.recall_scores is None and state._memory_bias_now == mem.memory_bias

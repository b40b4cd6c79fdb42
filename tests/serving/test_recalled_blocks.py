"""The answer reads the question's retrieval heads' best blocks louder (extra parts of the merge):
``recalled_local_bias`` for their best local block where the local context matched better than
memory, ``recalled_block_bias`` for their best memory block."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from serving_helpers import SMALL, prompt, tiny_engine

from memllm.attention import READ_LAST, READ_QUESTION

# a window the 40-token prompt fits in: nothing is evicted, so memory is empty and the local part is
# the whole layer
WIDE = dataclasses.replace(SMALL, window=64, recalled_local_bias=1.5)


def _by_hand(state, layer: int, q: torch.Tensor, bias: float, lo: int, hi: int) -> torch.Tensor:
    """Softmax over every key read so far and the new ones (causal), the keys in slots [lo, hi) at
    logit ``bias``: q (1, Hq, T, D) pre-RoPE at the new slots -> (1, Hq, T, D) float32."""
    t = q.shape[2]
    end = state.buf.length + t
    keys = state.buf.rot[layer, 0, :, :end].float()  # (Hkv, end, D)
    values = state.buf.val[layer, 0, :, :end].float()
    groups = state.cfg.n_heads // state.cfg.n_kv_heads
    keys, values = keys.repeat_interleave(groups, 0), values.repeat_interleave(groups, 0)
    q_rot = state.rotate_new(q)[0].float()  # (Hq, T, D)
    logits = q_rot @ keys.transpose(1, 2) * state._scale  # (Hq, T, end)
    logits[:, :, lo:hi] += bias
    slot = torch.arange(end)
    query_slot = torch.arange(state.buf.length, end)
    logits = logits.masked_fill(slot[None, :] > query_slot[:, None], float("-inf"))
    return (torch.softmax(logits, -1) @ values).unsqueeze(0)


@pytest.mark.parametrize("t", [1, 3])  # a decode step; the question's forward
@pytest.mark.parametrize("layer", [0, 2])
def test_the_recalled_block_reads_at_its_bias(tiny, t, layer):
    engine = tiny_engine(tiny, WIDE)
    state = engine.new_state("memory")
    engine.prefill(state, prompt(0, 40))
    assert state.memory.num_blocks() == 0 and state.buf.length == 40
    state.recall_scores, state._recalled_local = (1.0, 2.0), (9, 17, state.local_start)
    state.reading = READ_QUESTION
    state.begin(t)
    assert state._boost_now == (9, 17)
    g = torch.Generator().manual_seed(layer + t)
    cfg = state.cfg
    q = torch.randn(1, cfg.n_heads, t, cfg.head_dim, generator=g)
    k = torch.randn(1, cfg.n_kv_heads, t, cfg.head_dim, generator=g)
    v = torch.randn(1, cfg.n_kv_heads, t, cfg.head_dim, generator=g)
    with torch.inference_mode():
        got = state.attend(layer, q, k, v)  # writes the new keys, so the reference reads them after
        want = _by_hand(state, layer, q, 1.5, 9, 17)
        plain = _by_hand(state, layer, q, 0.0, 9, 17)
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-5)
    assert (want - plain).abs().max() > 1e-3  # the guard: the bias moves the output


def test_the_boosted_slots_follow_the_evictions_since_the_vote(tiny):
    """Evictions drop the first local slots (after the 4 sinks) and shift the later ones down: the
    block's surviving tokens are where they moved to."""
    state = tiny_engine(tiny, WIDE).new_state("memory")
    state.n_tokens, state.local_start = 500, 100
    state.recall_scores = (1.0, 2.0)
    for block, local_start, want in [
        ((9, 17, 100), 100, (9, 17)),  # nothing evicted since
        ((9, 17, 100), 104, (5, 13)),
        ((9, 17, 100), 108, (4, 9)),  # slots 9-12 held tokens 100+5..100+8: the first 3 left
        ((9, 17, 100), 113, None),  # all of it left
        ((1, 9, 100), 102, (1, 7)),  # sinks 1-3 stay, local 4-8 lose 2 and shift
        ((1, 4, 100), 200, (1, 4)),  # sinks only
    ]:
        state._recalled_local, state.local_start = block, local_start
        assert state._boosted_slots() == want, (block, local_start)
    state._recalled_local, state.local_start = (9, 17, 100), 100
    state.recall_scores = (2.0, 1.0)  # memory matched better: its own bias, no local boost
    assert state._boosted_slots() is None
    state.recall_scores = (1.0, 2.0)
    state.mem = dataclasses.replace(WIDE, recalled_local_bias=0.0)
    assert state._boosted_slots() is None


def test_only_answers_read_the_recalled_block_louder(tiny):
    """A new prompt's forward clears the vote; reading never boosts."""
    state = tiny_engine(tiny, WIDE).new_state("memory")
    tiny_engine(tiny, WIDE).prefill(state, prompt(1, 40))
    state.recall_scores, state._recalled_local = (1.0, 2.0), (9, 17, state.local_start)
    state.reading = READ_LAST
    state.begin(1)  # a decode step of the answer
    assert state._boost_now == (9, 17)
    state._pending = 0
    state.begin(5)  # a new prompt
    assert state._boost_now is None and state._recalled_local is None and state.recall_scores is None


def test_a_negative_local_bias_is_refused(tiny):
    with pytest.raises(ValueError, match="recalled_local_bias"):
        tiny_engine(tiny, dataclasses.replace(WIDE, recalled_local_bias=-1.0)).new_state("memory")


def _layer_by_hand(state, layer: int, q: torch.Tensor, memory_extra: float, at: slice) -> torch.Tensor:
    """One decode step's layer by hand: one softmax over the local keys (causal) and the retrieved
    memory keys (rotated at the block query position, at ``_memory_bias_now``), the memory keys in
    ``at`` at ``memory_extra`` more. q (1, Hq, 1, D) pre-RoPE -> (1, Hq, 1, D) float32."""
    end = state.buf.length + 1
    got = state._retrieved[layer]
    groups = state.cfg.n_heads // state.cfg.n_kv_heads
    local_k = state.buf.rot[layer, 0, :, :end].float().repeat_interleave(groups, 0)  # (Hq, end, D)
    local_v = state.buf.val[layer, 0, :, :end].float().repeat_interleave(groups, 0)
    mem_k = got.keys[0].float().repeat_interleave(groups, 0)  # (Hq, n, D)
    mem_v = got.values[0].float().repeat_interleave(groups, 0)
    local_logits = state.rotate_new(q)[0].float() @ local_k.transpose(1, 2) * state._scale  # (Hq, 1, end)
    q_mem = state._rotate_at(q, state._block_query_position)[0].float()
    mem_logits = q_mem @ mem_k.transpose(1, 2) * state._scale + state._memory_bias_now  # (Hq, 1, n)
    mem_logits[:, :, at] += memory_extra
    mem_logits = mem_logits.masked_fill(~got.mask[0, 0], float("-inf"))
    weights = torch.softmax(torch.cat([local_logits, mem_logits], -1), -1)
    return (weights @ torch.cat([local_v, mem_v], 1)).unsqueeze(0)


@pytest.mark.parametrize("layer", [0, 2])
@pytest.mark.parametrize("scores", [(2.0, 1.0), (1.0, 2.0)])  # memory matched better; the local context did
def test_the_recalled_memory_block_reads_at_its_bias_above_memory(tiny, layer, scores):
    mem = dataclasses.replace(SMALL, recalled_memory_bias=1.25, recalled_local_bias=0.0, recalled_block_bias=2.0)
    engine = tiny_engine(tiny, mem)
    state = engine.new_state("memory")
    engine.prefill(state, prompt(2, 100))
    assert state.memory.num_blocks() > 4
    state.recall_scores = scores
    state.reading = READ_LAST
    state.begin(1)  # a decode step of the answer
    cfg = state.cfg
    g = torch.Generator().manual_seed(layer)
    q = torch.randn(1, cfg.n_heads, 1, cfg.head_dim, generator=g)
    k = torch.randn(1, cfg.n_kv_heads, 1, cfg.head_dim, generator=g)
    v = torch.randn(1, cfg.n_kv_heads, 1, cfg.head_dim, generator=g)
    with torch.inference_mode():
        plain = state.attend(layer, q, k, v)  # no recalled block yet: learns this step's blocks
        ids = state._retrieved[layer].ids
        assert len(ids) >= 2
        state._recalled_block = int(ids[1])  # the same search again: the second block read louder
        got = state.attend(layer, q, k, v)
        at = slice(mem.block_size, 2 * mem.block_size)
        want = _layer_by_hand(state, layer, q, 2.0, at)
        torch.testing.assert_close(plain.float(), _layer_by_hand(state, layer, q, 0.0, at), rtol=1e-4, atol=1e-5)
    assert state._memory_bias_now == (1.25 if scores[0] > scores[1] else mem.answer_memory_bias)
    torch.testing.assert_close(got.float(), want, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-3  # the guard: the bias moves the output


@pytest.mark.parametrize("seed", [3, 4])
def test_the_recalled_memory_block_is_the_heads_first_choice_and_only_answers_use_it(tiny, seed, monkeypatch):
    from memllm.attention import StreamingAttention

    voted = []
    real = StreamingAttention._heads_vote

    def spy(self, ballots, count):
        voted.append(real(self, ballots, count))
        return voted[-1]

    monkeypatch.setattr(StreamingAttention, "_heads_vote", spy)
    mem = dataclasses.replace(SMALL, final_consensus=2, question_heads="2:1,0:3", recalled_block_bias=2.0)
    engine = tiny_engine(tiny, mem)
    state = engine.new_state("memory")
    engine.prefill(state, prompt(seed, 100))  # its last 16 tokens are the question: the heads vote
    (chosen,) = voted
    assert len(chosen) == 2 and state._recalled_block == int(chosen[0])  # the heads' best
    assert all(state._recalled_block in got.ids.tolist() for got in state._retrieved.values())
    at = state._recalled_block_at(state._retrieved[0])
    assert at is not None and at.stop - at.start == mem.block_size
    state._answering = False  # a forward that reads
    assert state._recalled_block_at(state._retrieved[0]) is None
    state._pending = 0
    state.reading = READ_LAST
    state.begin(5)  # a new prompt
    assert state._recalled_block is None

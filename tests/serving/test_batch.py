"""A batched decode step, and a packed step that also reads prompt chunks, give every stream the
logits it would get alone."""

from __future__ import annotations

import pytest
import torch
from serving_helpers import prompt

from memllm.serving import decode_step
from memllm.serving.batch import packed_step
from memllm.serving.batch_kv import BatchKV

# (mode, prompt length): memory streams long enough to have evicted and to search memory
STREAMS = [("memory", 5), ("memory", 100), ("window", 70), ("full", 23), ("memory", 41), ("window", 3)]


@pytest.mark.parametrize("shared_kv", [False, True], ids=["per-stream", "shared-kv"])
@pytest.mark.parametrize("steps", [40])
def test_batched_decode_equals_per_stream_decode(engine, steps, shared_kv):
    alone, batched = [], []
    for i, (mode, n) in enumerate(STREAMS):
        ids = prompt(i, n)
        a, b = engine.new_state(mode), engine.new_state(mode)
        engine.prefill(a, ids)
        engine.prefill(b, ids)
        alone.append(a)
        batched.append(b)
    tokens = [int(t) for t in prompt(99, len(STREAMS))]
    worst = 0.0
    cfg = engine.model.config
    kv = BatchKV(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, engine.model.dtype) if shared_kv else None
    with torch.inference_mode():
        for step in range(steps):
            if step == steps // 2:  # a stream reads a prompt between steps: its shared row is copied again
                engine.prefill(alone[1], prompt(7, 9))
                engine.prefill(batched[1], prompt(7, 9))
            ref = torch.stack(
                [
                    s.forward(engine.model, torch.tensor([[t]]), last_only=True)[0, -1]
                    for s, t in zip(alone, tokens, strict=True)
                ]
            )
            got = decode_step(engine.model, batched, tokens, kv=kv)
            assert got.shape == ref.shape == (len(STREAMS), engine.model.config.vocab_size)
            worst = max(worst, float((got - ref).abs().max()))
            tokens = ref.argmax(-1).tolist()
    assert worst < 1e-4, worst
    for a, b in zip(alone, batched, strict=True):
        assert (a.n_tokens, a.buf.length, a.evicted_blocks) == (b.n_tokens, b.buf.length, b.evicted_blocks)
    assert any(s.evicted_blocks for s in batched if s.mode == "memory")


class _Broken:
    """A memory source whose search fails."""

    def __init__(self, inner):
        self.inner = inner

    def num_blocks(self) -> int:
        return 1

    def search(self, layer, queries, k):
        raise OSError("disk gone")


@pytest.mark.parametrize("shared_kv", [False, True], ids=["per-stream", "shared-kv"])
def test_a_failing_stream_does_not_disturb_the_others(engine, shared_kv):
    cfg = engine.model.config
    kv = BatchKV(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, engine.model.dtype) if shared_kv else None
    ok, ref = engine.new_state("memory"), engine.new_state("memory")
    bad = engine.new_state("memory")
    for s in (ok, ref, bad):
        engine.prefill(s, prompt(3, 20))
    bad.memory = _Broken(bad.memory)
    before = bad.n_tokens
    failures: dict[int, Exception] = {}
    got = decode_step(engine.model, [ok, bad], [7, 7], failures, kv=kv)
    want = decode_step(engine.model, [ref], [7])
    assert list(failures) == [1] and isinstance(failures[1], OSError)
    assert torch.isnan(got[1]).all()
    assert (got[0] - want[0]).abs().max() < 1e-4
    assert bad.n_tokens == before and ok.n_tokens == before + 1
    with pytest.raises(OSError):
        decode_step(engine.model, [bad], [7])


@pytest.mark.parametrize("shared_kv", [False, True], ids=["per-stream", "shared-kv"])
def test_packed_step_reads_prompt_chunks_while_streams_decode(engine, shared_kv):
    """Prompt chunks of three newcomers (memory mode past its window, window, full) and one token of
    four decoding streams in one forward: the same logits and states as reading them apart."""
    cfg = engine.model.config
    kv = BatchKV(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, engine.model.dtype) if shared_kv else None
    running = [("memory", 60), ("window", 40), ("full", 9), ("memory", 3)]
    alone, packed = [], []
    for i, (mode, n) in enumerate(running):
        pair = engine.new_state(mode), engine.new_state(mode)
        for s in pair:
            engine.prefill(s, prompt(i, n))
        alone.append(pair[0])
        packed.append(pair[1])
    readers = [("memory", 90), ("window", 37), ("full", 16)]
    r_alone = [engine.new_state(mode) for mode, _ in readers]
    r_packed = [engine.new_state(mode) for mode, _ in readers]
    prompts = [prompt(20 + i, n) for i, (_, n) in enumerate(readers)]
    tokens = [int(t) for t in prompt(99, len(running))]
    read = [0] * len(readers)
    with torch.inference_mode():
        for _ in range(8):  # chunks of 16 (the engine's memory chunk): the readers finish at different steps
            chunks = []
            for j, ids in enumerate(prompts):
                if read[j] < len(ids):
                    chunks.append((j, ids[read[j] : read[j] + engine.prefill_chunk(r_packed[j])]))
            want_c = [r_alone[j].forward(engine.model, torch.tensor([c]), last_only=True)[0, -1] for j, c in chunks]
            want_d = torch.stack(
                [
                    s.forward(engine.model, torch.tensor([[t]]), last_only=True)[0, -1]
                    for s, t in zip(alone, tokens, strict=True)
                ]
            )
            got_c, got_d = packed_step(engine.model, [(r_packed[j], c) for j, c in chunks], packed, tokens, kv=kv)
            assert got_c.shape == (len(chunks), cfg.vocab_size) and got_d.shape == (len(running), cfg.vocab_size)
            if chunks:
                assert (got_c - torch.stack(want_c)).abs().max() < 1e-4
            assert (got_d - want_d).abs().max() < 1e-4
            for j, c in chunks:
                read[j] += len(c)
            tokens = want_d.argmax(-1).tolist()
    assert read == [len(p) for p in prompts]
    for a, b in zip([*alone, *r_alone], [*packed, *r_packed], strict=True):
        assert (a.n_tokens, a.buf.length, a.evicted_blocks) == (b.n_tokens, b.buf.length, b.evicted_blocks)
    assert r_packed[0].evicted_blocks, "the memory-mode reader went past its window"


def test_a_failing_prompt_chunk_fails_alone(engine):
    ok, ref = engine.new_state("memory"), engine.new_state("memory")
    for s in (ok, ref):
        engine.prefill(s, prompt(3, 20))
    too_long = engine.new_state("full")
    engine.prefill(too_long, prompt(4, engine.model.config.max_positions - 2))
    reader, reader_ref = engine.new_state("window"), engine.new_state("window")
    chunk_failures: dict[int, Exception] = {}
    with torch.inference_mode():
        got_c, got_d = packed_step(
            engine.model, [(too_long, prompt(5, 8)), (reader, prompt(6, 8))], [ok], [7], {}, None, chunk_failures
        )
        want_c = reader_ref.forward(engine.model, torch.tensor([prompt(6, 8)]), last_only=True)[0, -1]
        want_d = decode_step(engine.model, [ref], [7])[0]
    assert list(chunk_failures) == [0] and "context" in str(chunk_failures[0])
    assert torch.isnan(got_c[0]).all() and (got_c[1] - want_c).abs().max() < 1e-4
    assert (got_d[0] - want_d).abs().max() < 1e-4
    assert too_long.n_tokens == engine.model.config.max_positions - 2 and reader.n_tokens == 8
    with pytest.raises(Exception, match="context"):  # without a failures dict it propagates
        packed_step(engine.model, [(too_long, prompt(5, 8))], [], [])

"""A batched decode step gives every stream the logits it would get alone."""

from __future__ import annotations

import pytest
import torch
from serving_helpers import prompt

from memllm.serving import decode_step
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

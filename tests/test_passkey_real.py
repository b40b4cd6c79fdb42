"""The real bundled model recalls a passkey from 12K tokens with memory, and not with window only."""

from __future__ import annotations

import pytest

from memllm.bench.passkey import build_prompt, run_trial
from memllm.engine import Engine
from memllm.settings import MemorySettings


@pytest.mark.slow
def test_passkey_at_12k_needs_memory(real_model):
    engine = Engine(real_model, MemorySettings())
    prompt = build_prompt(engine, 12 * 1024, depth=0.3, key=73914, filler="grass")
    assert len(prompt.ids) == 12 * 1024
    # the needle sits ~8K tokens before the question: far outside sinks + window
    assert len(prompt.ids) - prompt.needle_span[1] > 2 * MemorySettings().window

    with_memory = run_trial(engine, prompt, "memory")
    window_only = run_trial(engine, prompt, "window")
    assert with_memory["passed"], with_memory["answer"]
    assert not window_only["passed"], window_only["answer"]

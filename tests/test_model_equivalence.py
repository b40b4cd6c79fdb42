"""Our forward pass equals transformers' on the same weights and tokens (prefill and decode)."""

from __future__ import annotations

import pytest
import torch

from memllm.attention import StreamingAttention
from memllm.bench.common import book_text, eval_data_dir
from memllm.settings import MemorySettings
from memllm.testing import tiny_transformers_model


def _ours_chunked(loaded, ids: torch.Tensor, chunk: int, n_decode: int) -> torch.Tensor:
    """Logits of ids (1, T): chunked prefill of the first T - n_decode tokens, then decode steps."""
    state = StreamingAttention(loaded.config, loaded.rope, MemorySettings(mode="full"), loaded.dtype)
    t = ids.shape[1]
    outs = []
    with torch.inference_mode():
        for start in range(0, t - n_decode, chunk):
            outs.append(state.forward(loaded.model, ids[:, start : min(start + chunk, t - n_decode)]))
        for i in range(t - n_decode, t):
            outs.append(state.forward(loaded.model, ids[:, i : i + 1]))
    assert state.n_tokens == t
    return torch.cat(outs, dim=1)


@pytest.mark.slow
def test_real_model_matches_transformers(real_model):
    from transformers import AutoModelForCausalLM

    text = book_text(eval_data_dir() / "gutenberg" / "alice_in_wonderland.txt")
    ids = torch.tensor([real_model.tokenizer(text[:6000])["input_ids"][:560]])
    assert ids.shape[1] == 560
    hf = AutoModelForCausalLM.from_pretrained(real_model.path, dtype=torch.float32).eval()
    with torch.inference_mode():
        ref = hf(ids).logits
    ours = _ours_chunked(real_model, ids, chunk=200, n_decode=24)
    diff = (ours - ref).abs().max().item()
    assert diff < 1e-3, diff
    # the decode steps alone (positions 536..559) also match
    assert (ours[:, -24:] - ref[:, -24:]).abs().max().item() < 1e-3
    assert torch.equal(ours[0].argmax(-1), ref[0].argmax(-1))


def test_tiny_model_matches_transformers(tiny):
    hf, _ = tiny_transformers_model()
    ids = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = hf(ids).logits
    ours = _ours_chunked(tiny, ids, chunk=64, n_decode=20)
    assert (ours - ref).abs().max().item() < 1e-4


def test_batched_rows_are_independent(tiny):
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        both = StreamingAttention(tiny.config, tiny.rope, MemorySettings(mode="full"), batch=2).forward(tiny.model, ids)
        one = StreamingAttention(tiny.config, tiny.rope, MemorySettings(mode="full")).forward(tiny.model, ids[1:])
    assert torch.allclose(both[1], one[0], atol=1e-5)


def test_full_mode_refuses_past_trained_length(tiny):
    from memllm.attention import ContextLengthError

    state = StreamingAttention(tiny.config, tiny.rope, MemorySettings(mode="full"))
    with pytest.raises(ContextLengthError, match="memory or window mode"):
        state.begin(tiny.config.max_positions + 1)

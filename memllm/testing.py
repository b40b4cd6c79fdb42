"""Small real parts for tests: a tiny random-weight Llama and the real bundled model, loaded once."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from memllm.loading import LoadedModel, build_model

REPO_ROOT = Path(__file__).resolve().parent.parent


def tiny_hf_config(layers: int = 3, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, vocab: int = 512):
    """A transformers LlamaConfig with a head layout unlike the bundled model's (4 q / 2 kv heads)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=heads * head_dim,
        intermediate_size=2 * heads * head_dim,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=False,
    )


def tiny_transformers_model(seed: int = 0, **config):
    """(transformers LlamaForCausalLM with random weights, its config), float32, eval mode."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_hf_config(**config)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger-than-default weights make attention patterns sharp and errors visible
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model, cfg


def tiny_loaded_model(seed: int = 0, **config) -> LoadedModel:
    """Our Transformer with the random weights of ``tiny_transformers_model`` (no tokenizer)."""
    hf, cfg = tiny_transformers_model(seed, **config)
    model, rope = build_model(cfg, hf.state_dict(), torch.float32)
    return LoadedModel(name="tiny", path=Path("."), model=model, tokenizer=None, hf_config=cfg, rope=rope)


def test_data_dir() -> Path:
    """Where tests keep the converted bundled model (reused across runs; gitignored)."""
    return Path(os.environ.get("MEMLLM_TEST_DATA_DIR", REPO_ROOT / ".test-data"))


test_data_dir.__test__ = False  # a helper, not a test, wherever a test module imports it


@functools.cache
def real_model(dtype: str = "float32") -> LoadedModel:
    from memllm.loading import load_model
    from memllm.settings import Settings

    return load_model(Settings(data_dir=test_data_dir(), dtype=dtype))

"""Helpers for the knowledge-base tests: a tiny random-weight Llama with a real fast tokenizer
(the bundled MiniLM WordPiece tokenizer, which ships offsets), and services over real SQLite files."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from memllm.engine import Engine
from memllm.knowledge.embeddings import Embedder, bundled_model_path
from memllm.loading import LoadedModel, build_model
from memllm.settings import MemorySettings, Settings

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

TINY_MEMORY = MemorySettings(
    mode="memory",
    sinks=4,
    window=64,
    chunk=32,
    block_size=16,
    representatives=2,
    top_k=4,
    memory_distance=64,
    decode_search_every=4,
)


def tiny_engine(seed: int = 0) -> Engine:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(str(bundled_model_path()))
    tok.chat_template = CHATML
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    sd = LlamaForCausalLM(cfg).state_dict()
    model, rope = build_model(cfg, sd, torch.float32)
    loaded = LoadedModel(name="tiny-random", path=Path("."), model=model, tokenizer=tok, hf_config=cfg, rope=rope)
    return Engine(loaded, TINY_MEMORY)


_EMBEDDER: Embedder | None = None


def shared_embedder() -> Embedder:
    """One real sentence embedder per test process (loading takes seconds)."""
    global _EMBEDDER
    if _EMBEDDER is None:
        _EMBEDDER = Embedder()
    return _EMBEDDER


@contextlib.asynccontextmanager
async def service_at(directory: Path, engine: Engine | None, **kwargs):
    from memllm.knowledge.service import temporary_service

    settings = Settings(data_dir=directory, memory=engine.memory_settings if engine else TINY_MEMORY)
    async with temporary_service(settings, directory, engine=engine, embedder=shared_embedder(), **kwargs) as svc:
        yield svc


PARAGRAPHS = [
    "The lighthouse keeper of Varnholm kept a ledger of every ship that passed the northern cape. "
    "He wrote the names in green ink and the cargo in black.",
    "Every winter the harbour froze for eleven weeks. The fishermen then repaired their nets in the long hall "
    "and told stories about the copper whale.",
    "In 1887 a storm destroyed the old pier. The town rebuilt it with granite from the quarry at Eskdal, "
    "which took four summers.",
    "The bakery on Tide Street sells cardamom bread on Sundays. Its recipe came from a sailor who had "
    "travelled to Zanzibar twice.",
]

"""``memllm bench speed``: prefill and decode tokens/s of our engine vs transformers, side by side.

Both run in the same process, on the same threads, dtype and tokens (real text from a book). For
transformers, prefill is one forward over the prompt with a cache, and decode is
``generate(max_new_tokens=N+1)`` minus ``generate(max_new_tokens=1)`` (greedy, EOS ignored).
Ours: chunked prefill, then N greedy decode steps. Decode bound: weight bytes / copy bandwidth.
"""

from __future__ import annotations

import time
from pathlib import Path

import psutil
import torch

from memllm.attention import block_layout
from memllm.bench.common import book_text, eval_data_dir, format_table, machine_info, write_json
from memllm.engine import Engine


def _tokens(engine: Engine, n: int) -> list[int]:
    text = book_text(eval_data_dir() / "gutenberg" / "moby_dick.txt")
    ids = engine.encode(text[: n * 8])
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


@torch.inference_mode()
def ours(engine: Engine, ids: list[int], decode_tokens: int, mode: str) -> tuple[float, float, int]:
    """(prefill tok/s, decode tok/s, process RSS bytes with the state and its memory still alive)."""
    state = engine.new_state(mode)
    t0 = time.perf_counter()
    logits = engine.prefill(state, ids)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        token = torch.tensor([[int(torch.argmax(logits))]])
        logits = state.forward(engine.model, token, last_only=True)[0, -1]
    decode_s = time.perf_counter() - t0
    return len(ids) / prefill_s, decode_tokens / decode_s, psutil.Process().memory_info().rss


@torch.inference_mode()
def transformers_reference(hf_model, ids: list[int], decode_tokens: int) -> tuple[float, float]:
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    hf_model(x, use_cache=True)
    prefill_s = time.perf_counter() - t0
    kw = {"do_sample": False, "pad_token_id": 0, "eos_token_id": None}
    t0 = time.perf_counter()
    hf_model.generate(x, max_new_tokens=1, min_new_tokens=1, **kw)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    hf_model.generate(x, max_new_tokens=decode_tokens + 1, min_new_tokens=decode_tokens + 1, **kw)
    many = time.perf_counter() - t0
    return len(ids) / prefill_s, decode_tokens / max(many - one, 1e-9)


def run(
    engine: Engine, contexts: list[int], decode_tokens: int, mode: str, out: Path, with_hf: bool = True
) -> list[dict]:
    from transformers import AutoModelForCausalLM

    hf = None
    if with_hf:
        hf = AutoModelForCausalLM.from_pretrained(engine.loaded.path, dtype=engine.model.dtype).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    rows = []
    for n in contexts:
        ids = _tokens(engine, n)
        ours(engine, ids[:64], 2, mode)  # warm-up
        p_ours, d_ours, rss = ours(engine, ids, decode_tokens, mode)
        row = {"context": n, "mode": mode, "prefill_ours": p_ours, "decode_ours": d_ours}
        if hf is not None and n <= engine.model.config.max_positions:
            p_hf, d_hf = transformers_reference(hf, ids, decode_tokens)
            row |= {
                "prefill_hf": p_hf,
                "decode_hf": d_hf,
                "prefill_ratio": p_ours / p_hf,
                "decode_ratio": d_ours / d_hf,
            }
        row["weight_GB_per_s"] = d_ours * weight_bytes / 1e9
        row["rss_MB"] = rss / 1e6  # before the state is dropped (afterwards the allocator returns it)
        if mode == "memory":
            layout = block_layout(engine.model.config, engine.memory_settings)
            reps = layout.representatives * layout.search_dim * 4 * layout.n_layers / layout.block_size
            row["memory_B_per_token"] = layout.bytes_per_token(2) + reps
        rows.append(row)
        print(format_table([row]), flush=True)
    write_json(
        out,
        {
            "bench": "speed",
            "machine": machine_info(),
            "dtype": str(engine.model.dtype),
            "weight_bytes": weight_bytes,
            "decode_tokens": decode_tokens,
            "rows": rows,
        },
    )
    return rows

"""``memllm bench ppl``: perplexity over a long book, every attention mode on the same tokens.

Tokens are read in chunks; each chunk's logits predict its next tokens (the first token of the
next chunk included), so every mode is scored on exactly tokens 1..N-1. Full attention runs only
within the model's trained length; for reference, transformers' own full attention scores the
first ``max_positions`` tokens, and every mode also reports its perplexity on that prefix.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from memllm.bench.common import book_text, format_table, machine_info, write_json
from memllm.engine import Engine


@torch.inference_mode()
def token_nll(engine: Engine, ids: list[int], mode: str, desc: str = "", **overrides) -> torch.Tensor:
    """Negative log-likelihood of ids[1:] (N-1,) float64, reading ids through one attention state."""
    state = engine.new_state(mode, **overrides)
    chunk = state.mem.chunk
    nll = torch.empty(len(ids) - 1, dtype=torch.float64)
    with tqdm(total=len(ids), desc=desc or mode, unit="tok", leave=False) as bar:
        for start in range(0, len(ids) - 1, chunk):
            piece = ids[start : min(start + chunk, len(ids) - 1)]
            logits = state.forward(engine.model, torch.tensor([piece]))[0]  # (T, V)
            targets = torch.tensor(ids[start + 1 : start + 1 + len(piece)])
            nll[start : start + len(piece)] = F.cross_entropy(logits, targets, reduction="none").double()
            bar.update(len(piece))
    return nll


@torch.inference_mode()
def transformers_nll(engine: Engine, ids: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(engine.loaded.path, dtype=engine.model.dtype).eval()
    logits = hf(torch.tensor([ids])).logits[0, :-1].float()
    return F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").double()


def run(
    engine: Engine, text_path: Path, n_tokens: int, modes: list[str], out: Path, with_hf: bool = True
) -> list[dict]:
    ids = engine.encode(book_text(text_path))[:n_tokens]
    prefix = min(len(ids), engine.model.config.max_positions)
    rows = []
    for mode in modes:
        use = ids if mode != "full" else ids[:prefix]
        t0 = time.perf_counter()
        nll = token_nll(engine, use, mode)
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "mode": mode,
                "tokens": len(use),
                "ppl": math.exp(nll.mean().item()),
                f"ppl_first_{prefix}": math.exp(nll[: prefix - 1].mean().item()),
                "ppl_after_prefix": math.exp(nll[prefix - 1 :].mean().item()) if len(nll) >= prefix else float("nan"),
                "tok/s": len(use) / seconds,
            }
        )
        print(format_table(rows[-1:]), flush=True)
    if with_hf:
        t0 = time.perf_counter()
        nll = transformers_nll(engine, ids[:prefix])
        rows.append(
            {
                "mode": "transformers-full",
                "tokens": prefix,
                "ppl": math.exp(nll.mean().item()),
                f"ppl_first_{prefix}": math.exp(nll.mean().item()),
                "ppl_after_prefix": float("nan"),
                "tok/s": prefix / (time.perf_counter() - t0),
            }
        )
    write_json(
        out,
        {
            "bench": "ppl",
            "text": str(text_path),
            "tokens": len(ids),
            "machine": machine_info(),
            "memory_settings": engine.memory_settings.__dict__,
            "rows": rows,
        },
    )
    return rows

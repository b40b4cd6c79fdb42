"""``memllm bench retrieval-heads``: which attention heads look at the passkey when the model answers.

Short passkey prompts (inside the trained range, where the model copies the key even with essays as
filler) are read with full attention. For every (layer, query head) the question's tokens put some
share of their attention on the needle's tokens; averaged over prompts, a few heads stand out (the
"retrieval heads" of Wu et al. 2024). On the bundled model the same heads lead with grass and with
essays as filler (docs/RESULTS.md, 2026-12-01/a8a0c33), and summing their scores over memory blocks ranks
the needle's block first where most layers' own searches miss it (``memllm bench needle-rank --heads``).
``MEMLLM_MEMORY_QUESTION_HEADS`` takes the printed list: the question's vote then uses those heads.
"""

from __future__ import annotations

import random

import torch
from tqdm import tqdm

from memllm.bench.needle_rank import last_qkv_outputs
from memllm.bench.passkey import QUESTION, PasskeyPrompt, build_prompt, trial_offset
from memllm.engine import Engine

CALIBRATION_DEPTHS = (0.2, 0.4, 0.6, 0.8)
# calibration prompts read the filler from trial 100 on: away from the trials `bench passkey` scores
CALIBRATION_TRIAL = 100


@torch.inference_mode()
def needle_attention(engine: Engine, prompt: PasskeyPrompt) -> torch.Tensor:
    """(n_layers, n_heads) float32: the attention share the question's tokens put on the needle.

    One full-attention forward over the whole prompt (keep it inside the trained range); the
    question's queries and every key are rotated at their true positions, as the forward does, and
    each entry is the softmax mass on the needle's tokens, averaged over the question's tokens.
    """
    cfg = engine.model.config
    hq, hkv, d = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    n_question = len(engine.encode(QUESTION))
    with last_qkv_outputs(engine) as qkv:
        state = engine.new_state("full")
        state.forward(engine.model, torch.tensor([prompt.ids]), last_only=True)
    total = len(prompt.ids)
    positions = torch.arange(total)
    causal = positions[None, :] > positions[-n_question:, None]  # (n_question, total)
    start, end = prompt.needle_span
    mass = torch.zeros(cfg.n_layers, hq)
    for layer in range(cfg.n_layers):
        out = qkv[layer][0].float()  # (total, (hq + 2 hkv) * d), before RoPE
        q = out[:, : hq * d].reshape(total, hq, d).transpose(0, 1)[None]
        k = out[:, hq * d : (hq + hkv) * d].reshape(total, hkv, d).transpose(0, 1)[None]
        q = engine.loaded.rope.apply(q, positions)[0, :, -n_question:]  # (hq, n_question, d)
        k = engine.loaded.rope.apply(k, positions)[0].repeat_interleave(hq // hkv, dim=0)  # (hq, total, d)
        logits = (q @ k.transpose(1, 2) / d**0.5).masked_fill(causal, float("-inf"))
        mass[layer] = logits.softmax(-1)[:, :, start:end].sum(-1).mean(-1)
    return mass


def calibrate(
    engine: Engine, length: int, filler: str, trials: int, depths: tuple[float, ...] = CALIBRATION_DEPTHS, seed: int = 0
) -> torch.Tensor:
    """(n_layers, n_heads): ``needle_attention`` averaged over ``trials`` x ``depths`` prompts of
    ``length`` tokens (random keys; the filler read from trial ``CALIBRATION_TRIAL`` on)."""
    rng = random.Random(seed)
    jobs = [(t, depth) for t in range(trials) for depth in depths]
    total = None
    for t, depth in tqdm(jobs, desc="retrieval heads", unit="prompt"):
        key = rng.randint(10000, 99999)
        prompt = build_prompt(engine, length, depth, key, filler, offset=trial_offset(CALIBRATION_TRIAL + t))
        mass = needle_attention(engine, prompt)
        total = mass if total is None else total + mass
    assert total is not None, "no calibration prompts"
    return total / len(jobs)


def top_heads(mass: torch.Tensor, count: int) -> list[dict]:
    """The ``count`` (layer, head) pairs with the most mass on the needle, most first."""
    flat = mass.flatten()
    order = flat.argsort(descending=True, stable=True)[:count].tolist()
    heads = mass.shape[1]
    return [{"layer": i // heads, "head": i % heads, "needle_mass": round(float(flat[i]), 4)} for i in order]

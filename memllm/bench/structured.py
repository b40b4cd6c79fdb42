"""``memllm bench structured``: per-token cost of grammar masks (constrained decoding) vs a decode step.

Three grammar libraries compete: llguidance, xgrammar and outlines-core (each optional here; a
missing one is skipped and said so). For each library and grammar (any JSON object; a JSON schema
with nesting, an enum, bounds and an array), on the configured model's tokenizer:

* ``compile_ms``: grammar -> a ready matcher (tokenizer setup excluded, it is done once per model);
* per generated token, the work a constrained stream adds to a decode step: compute the allowed-token
  mask, apply it to the (V,) logits, advance the matcher by the sampled token. Tokens are sampled
  uniformly among the allowed ones (random logits), ``tokens`` per run, the matcher restarted when
  its document is complete: the states visited are those of real outputs, strings included
  (where nearly every token is allowed). ``mask_us`` is the median per token, ``p90_us`` its 90th
  percentile.

The decode step is timed through the real scheduler (``memllm bench batch``'s measure: median step
over the steps that held all B streams) at 1 and 8 streams. Masks are computed per stream on the
model thread, one after the other, so at B streams a step pays B masks:
``overhead_B = B * mask_us / step_B``. The goal is < 10 % at 8 streams.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memllm.bench.common import machine_info, write_json
from memllm.engine import Engine

NESTED_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
GRAMMARS: dict[str, dict[str, Any]] = {"json_object": {"type": "object"}, "json_schema": NESTED_SCHEMA}


@dataclass
class Backend:
    """One library behind four calls: ``new(schema) -> matcher``; ``step(matcher, logits (V,))``
    masks the logits in place; ``advance(matcher, token)``; ``finished(matcher)``. Each library is
    used as its docs show (xgrammar without free whitespace, as our JSON style)."""

    name: str
    new: Callable[[dict[str, Any]], Any]
    step: Callable[[Any, torch.Tensor], None]
    advance: Callable[[Any, int], None]
    finished: Callable[[Any], bool]


def llguidance_backend(tokenizer: Any, vocab: int) -> Backend:
    """The shipped path: :class:`memllm.constrain.Constraint` (llguidance) on our grammar text."""
    from memllm.constrain import Constraint, grammar_tokenizer, json_grammar

    tok = grammar_tokenizer(tokenizer, vocab, [tokenizer.eos_token_id])

    def step(c: Constraint, logits: torch.Tensor) -> None:
        logits.copy_(c.mask(logits))

    return Backend("llguidance", lambda s: Constraint(json_grammar(s), tok), step, Constraint.advance, lambda c: c.done)


def xgrammar_backend(tokenizer: Any, vocab: int) -> Backend:
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    mask = xgr.allocate_token_bitmask(1, info.vocab_size)

    def new(schema: dict[str, Any]) -> Any:
        return xgr.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))

    def step(m: Any, logits: torch.Tensor) -> None:
        m.fill_next_token_bitmask(mask)
        xgr.apply_token_bitmask_inplace(logits.view(1, -1), mask)

    return Backend("xgrammar", new, step, lambda m, t: m.accept_token(t), lambda m: m.is_terminated())


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable stand-in character -> byte."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def outlines_backend(tokenizer: Any, vocab: int) -> Backend:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    decoder = _byte_decoder()
    special = set(tokenizer.all_special_ids)
    table: dict[bytes, list[int]] = {}
    for token, i in tokenizer.get_vocab().items():
        if i not in special and i < vocab and all(c in decoder for c in token):
            table.setdefault(bytes(decoder[c] for c in token), []).append(i)
    vocabulary = Vocabulary(tokenizer.eos_token_id, table)
    mask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)

    def new(schema: dict[str, Any]) -> Any:
        return Guide(Index(build_regex_from_schema(json.dumps(schema)), vocabulary))

    def step(g: Any, logits: torch.Tensor) -> None:
        g.write_mask_into(mask.data_ptr(), mask.numel(), 4)
        bits = (mask.view(-1, 1) >> torch.arange(32, dtype=torch.int32)) & 1  # (words, 32)
        logits.masked_fill_(bits.view(-1)[: logits.numel()] == 0, float("-inf"))

    return Backend("outlines-core", new, step, lambda g, t: g.advance(t), lambda g: g.is_finished())


BACKENDS = {"llguidance": llguidance_backend, "xgrammar": xgrammar_backend, "outlines-core": outlines_backend}


def mask_costs(backend: Backend, schema: dict[str, Any], vocab: int, tokens: int, per_doc: int = 64) -> dict:
    """Compile time and per-token constraint time of one backend on one grammar (see the docstring)."""
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    matcher = backend.new(schema)
    compile_ms = 1000 * (time.perf_counter() - t0)
    times: list[float] = []
    in_doc = 0
    for _ in range(tokens):
        logits = torch.rand(vocab, generator=gen)
        t0 = time.perf_counter()
        backend.step(matcher, logits)
        token = int(torch.argmax(logits))
        backend.advance(matcher, token)
        times.append(time.perf_counter() - t0)
        in_doc += 1
        if backend.finished(matcher) or in_doc >= per_doc:
            matcher, in_doc = backend.new(schema), 0
    us = sorted(1e6 * t for t in times)
    return {"compile_ms": compile_ms, "mask_us": statistics.median(us), "p90_us": us[int(0.9 * (len(us) - 1))]}


async def decode_steps(engine: Engine, streams: list[int], threads: int | None) -> dict[int, float]:
    """Median decode step (ms) at each stream count, through the real scheduler."""
    from memllm.bench.batch import measure
    from memllm.serving.scheduler import Scheduler

    sched = Scheduler(engine, max_batch=max(streams), threads=threads)
    try:
        for b in streams:
            await measure(sched, engine, b, 3, None)  # warm-up
        return {b: (await measure(sched, engine, b, 32, None))["step_ms"] for b in streams}
    finally:
        await sched.close()


def run(engine: Engine, libraries: list[str], tokens: int, out: Path, threads: int | None = None) -> list[dict]:
    """The table: one row per library and grammar (see the module docstring)."""
    steps = asyncio.run(decode_steps(engine, [1, 8], threads))
    vocab = engine.model.config.vocab_size
    rows = []
    for lib in libraries:
        try:
            backend = BACKENDS[lib](engine.tokenizer, vocab)
        except ImportError as exc:
            print(f"skipping {lib}: {exc}")
            continue
        for grammar, schema in GRAMMARS.items():
            cost = mask_costs(backend, schema, vocab, tokens)
            rows.append(
                {
                    "library": lib,
                    "grammar": grammar,
                    **cost,
                    "step1_ms": steps[1],
                    "step8_ms": steps[8],
                    "overhead1_pct": 100 * cost["mask_us"] / 1000 / steps[1],
                    "overhead8_pct": 100 * 8 * cost["mask_us"] / 1000 / steps[8],
                }
            )
    write_json(out, {"bench": "structured", "machine": machine_info(), "tokens": tokens, "rows": rows})
    return rows

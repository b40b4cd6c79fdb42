"""Long-document QA on L-Eval files: ingest each document, ask its questions in every mode.

Modes (same model, same run):
  ``memory``      the knowledge base's memory only (kNN over the document's blocks, restricted to the
                  blocks of the hybrid search's candidate chunks); the prompt holds the question
  ``rag``         the best chunks (hybrid search) in the prompt, no memory
  ``hybrid``      both
  ``truncation``  baseline: as much of the document's beginning as fits ``--context`` tokens, then
                  the question, full attention (the document prefix is read once per document)

Scores: multiple choice (``evaluation == "exam"``, e.g. quality.jsonl): exact match of the option
letter. By default the answer's first token is constrained to the four letters (``choice="letters"``:
the option whose letter the model finds most likely, as MMLU-style harnesses score small models,
which rarely answer in the asked format); ``choice="free"`` lets the model write and reads the first
letter it names. Open questions (``f1``, e.g. natural_question.jsonl): token F1 after SQuAD normalisation
and Porter stemming (best over the gold answers given).
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memllm.evals.common import format_table, token_f1

MODES = ("memory", "rag", "hybrid", "truncation")
CHOICES = ("letters", "free")
LETTERS = ("A", "B", "C", "D")
MC_INSTRUCTION = "Answer with the letter (A, B, C or D) of the correct option only."
OPEN_INSTRUCTION = "Answer the question with a short phrase from the document."


def load_leval(
    path: Path, limit: int | None = None, max_chars: int | None = None, offset: int = 0
) -> list[dict[str, Any]]:
    """``limit`` documents (of at most ``max_chars`` characters, when given) after the first
    ``offset`` of them, in file order."""
    rows = []
    kept = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            row = json.loads(line)
            if max_chars and len(row["input"]) > max_chars:
                continue
            kept += 1
            if kept <= offset:
                continue
            rows.append(row)
            if limit and len(rows) >= limit:
                break
    return rows


def is_multiple_choice(row: dict[str, Any], question: str) -> bool:
    return row.get("evaluation") == "exam" or bool(re.search(r"\n\s*\(A\)", question))


def letter_of(text: str) -> str | None:
    """The option letter of an answer: "(B)" anywhere, else a leading "B", else the first lone A-D."""
    text = text.strip()
    for pattern in (r"\(([ABCD])\)", r"^([ABCD])\b", r"\b([ABCD])\b"):
        m = re.search(pattern, text)
        if m:
            return m.group(1)
    return None


def score(pred: str, gold: str | list[str], mc: bool) -> float:
    golds = gold if isinstance(gold, list) else [gold]
    if mc:
        want = letter_of(golds[0])
        return float(want is not None and letter_of(pred) == want)
    return max(token_f1(pred, g) for g in golds)


def _truncation_state(engine, doc: str, context: int, reserve: int):
    """(state after reading '<user turn start> + document prefix', tokens of the prefix)."""
    open_ids = engine.encode("<|im_start|>user\n") if "<|im_start|>" in (engine.tokenizer.chat_template or "") else []
    doc_ids = engine.encode(doc)[: max(0, context - reserve - len(open_ids))]
    state = engine.new_state(mode="full")
    engine.prefill(state, open_ids + doc_ids)
    return state, len(open_ids) + len(doc_ids)


def letter_bias(tokenizer) -> tuple[tuple[int, float], ...]:
    """The logit bias that restricts one token to the option letters A-D."""
    from memllm.sampling import only_tokens_bias

    ids = [tokenizer.encode(letter, add_special_tokens=False) for letter in LETTERS]
    if any(len(i) != 1 for i in ids):
        raise ValueError(f"the tokenizer splits an option letter into several tokens: {ids}")
    return only_tokens_bias([i[0] for i in ids])


def _truncation_answer(engine, base_state, question_text: str, max_tokens: int, logit_bias=()) -> str:
    from memllm.sampling import SamplingParams

    suffix = "\n\n" + question_text
    if "<|im_start|>" in (engine.tokenizer.chat_template or ""):
        suffix += "<|im_end|>\n<|im_start|>assistant\n"
    state = copy.deepcopy(base_state)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logit_bias=logit_bias)
    toks = list(engine.generate(state, engine.encode(suffix), params))
    return engine.tokenizer.decode(toks, skip_special_tokens=True).strip()


async def evaluate(
    data: Path,
    *,
    settings,
    limit: int | None = 1,
    offset: int = 0,
    questions: int | None = 5,
    modes: tuple[str, ...] = MODES,
    context: int = 8192,
    max_tokens: int | None = None,
    engine=None,
    max_chars: int | None = None,
    choice: str = "letters",
    log=print,
) -> dict[str, Any]:
    from memllm.knowledge.service import temporary_service

    if choice not in CHOICES:
        raise ValueError(f"unknown choice {choice!r}; choose one of {CHOICES}")
    rows = load_leval(data, limit, max_chars, offset)
    details = []
    t_start = time.perf_counter()
    ingest_tokens, ingest_s = 0, 0.0
    with tempfile.TemporaryDirectory(prefix="memllm-longdoc-") as tmp:
        async with temporary_service(settings, Path(tmp), engine=engine) as svc:
            engine = svc.engine
            await svc.create_kb("longdoc")
            for d, row in enumerate(rows, start=offset):
                name = f"{data.stem}-{d}"
                t0 = time.perf_counter()
                res = await svc.ingest_text("longdoc", name, row["input"])
                if res.status != "ready":
                    log(f"document {d}: {res.error}")
                    continue
                ingest_tokens += res.tokens
                ingest_s += time.perf_counter() - t0
                log(f"document {d}: {res.tokens} tokens ingested in {time.perf_counter() - t0:.0f} s")
                qs = list(zip(row["instructions"], row["outputs"], strict=False))[: questions or None]
                base = None
                if "truncation" in modes:
                    base, _ = await svc._run_model(_truncation_state, engine, row["input"], context, 320)
                for q, gold in qs:
                    mc = is_multiple_choice(row, q)
                    instruction = MC_INSTRUCTION if mc else OPEN_INSTRUCTION
                    constrained = mc and choice == "letters"
                    n_out = 1 if constrained else max_tokens or (8 if mc else 24)
                    bias = letter_bias(engine.tokenizer) if constrained else ()
                    rec: dict[str, Any] = {"document": d, "question": q[:200], "gold": gold, "mc": mc}
                    for mode in modes:
                        if mode == "truncation":
                            pred = await svc._run_model(
                                _truncation_answer, engine, base, f"{instruction}\nQuestion: {q}", n_out, bias
                            )
                        else:
                            ans = await svc.ask(
                                "longdoc",
                                q,
                                mode=mode,
                                instruction=instruction,
                                max_tokens=n_out,
                                documents=[res.document_id],
                                system=None,
                                logit_bias=bias,
                            )
                            pred = ans.text
                        s = score(pred, gold, mc)
                        rec[mode] = {"answer": pred[:200], "score": s}
                    details.append(rec)
                    log("  " + "  ".join(f"{m}={rec[m]['score']:.2f}" for m in modes) + f"  | {q[:60]!r}")
    metric = "exact match" if rows and is_multiple_choice(rows[0], rows[0]["instructions"][0]) else "token F1"
    return {
        "config": {
            "data": str(data),
            "max_chars": max_chars,
            "limit": limit,
            "offset": offset,
            "questions": questions,
            "context": context,
            "choice": choice,
            "memory": dict(vars(settings.memory)) if hasattr(settings.memory, "__dict__") else str(settings.memory),
        },
        "metric": metric,
        "modes": list(modes),
        "rows": score_table(details, modes, metric),
        "ingest": {
            "tokens": ingest_tokens,
            "seconds": ingest_s,
            "tokens_per_s": ingest_tokens / ingest_s if ingest_s else 0.0,
        },
        "seconds": time.perf_counter() - t_start,
        "details": details,
    }


def score_table(details: list[dict[str, Any]], modes: Sequence[str], metric: str) -> list[dict[str, Any]]:
    """One row per mode: the number of questions and the mean score under ``metric``."""
    table = []
    for m in modes:
        scores = [d[m]["score"] for d in details if m in d]
        table.append({"mode": m, "questions": len(scores), metric: sum(scores) / len(scores) if scores else 0.0})
    return table


def merge(results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result from runs over disjoint document ranges of the same file (``--offset``/``--limit``
    shards): details in document order, scores recomputed over all questions, ingestion summed.

    Raises ``ValueError`` when the runs differ in data, modes or settings, or overlap in documents."""
    if not results:
        raise ValueError("nothing to merge")
    same = ("data", "max_chars", "questions", "context", "choice", "memory")
    first = results[0]
    for r in results[1:]:
        diff = [k for k in same if r["config"].get(k) != first["config"].get(k)]
        if diff or r.get("modes") != first.get("modes") or r["metric"] != first["metric"]:
            raise ValueError(f"the runs differ in {diff or ['modes or metric']}; only shards of one run merge")
    docs = [{d["document"] for d in r["details"]} for r in results]
    seen: set[int] = set()
    for ds in docs:
        if seen & ds:
            raise ValueError(f"the runs overlap in documents {sorted(seen & ds)}")
        seen |= ds
    details = sorted((d for r in results for d in r["details"]), key=lambda d: d["document"])
    tokens = sum(r["ingest"]["tokens"] for r in results)
    seconds = sum(r["ingest"]["seconds"] for r in results)
    config = {**first["config"], "limit": None, "offset": 0, "merged_from": [r["config"] for r in results]}
    return {
        "config": config,
        "metric": first["metric"],
        "modes": first["modes"],
        "rows": score_table(details, first["modes"], first["metric"]),
        "ingest": {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0},
        "seconds": sum(r["seconds"] for r in results),
        "details": details,
    }


def run(data: Path, **kwargs: Any) -> dict[str, Any]:
    return asyncio.run(evaluate(data, **kwargs))


def print_result(result: dict[str, Any]) -> str:
    metric = result["metric"]
    text = format_table(result["rows"], ["mode", "questions", metric])
    ing = result["ingest"]
    return (
        text
        + f"\n\ningested {ing['tokens']} tokens at {ing['tokens_per_s']:.0f} tok/s; total {result['seconds']:.0f} s"
    )

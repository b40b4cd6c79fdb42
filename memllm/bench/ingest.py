"""``memllm bench ingest``: knowledge-base ingestion throughput against the model's raw prefill.

For each document (the ``input`` fields of an L-Eval ``.jsonl`` file, or text files), in one
process and one after the other:

``ingest``   :meth:`KnowledgeService.ingest_text` into a fresh knowledge base (clean, tokenize,
             chunk, embed, read through the model, persist blocks and chunks);
``model``    the model's read of the same tokens alone, as ingestion reads them (``encode_document``:
             a window read at the default ``ingest_top_k`` 0), what ingestion spends in the model;
``full``     full-attention prefill of the same tokens, the model's raw prefill: pieces of at most
             the trained context length, each from a fresh state (full attention reads no more).

A warm-up document is ingested first so one-time costs (loading the embedder, the first FAISS
index) are not counted. Ratios are of tokens per second, measured side by side.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from memllm.bench.common import machine_info, write_json

WARMUP_TEXT = "A short warm-up document. " * 40


def load_documents(path: Path, limit: int | None) -> list[tuple[str, str]]:
    """(name, text) pairs: the ``input`` of each line of a .jsonl file, or each text file of a
    folder (sorted), or one text file; at most ``limit``."""
    path = Path(path)
    if path.is_dir():
        docs = [(p.name, p.read_text(encoding="utf-8", errors="replace")) for p in sorted(path.rglob("*.txt"))]
    elif path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if line.strip():
                docs.append((f"{path.stem}-{i}", json.loads(line)["input"]))
    else:
        docs = [(path.name, path.read_text(encoding="utf-8", errors="replace"))]
    if not docs:
        raise ValueError(f"{path}: no documents")
    return docs[:limit] if limit else docs


def _timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def full_prefill_seconds(engine, ids: Sequence[int]) -> float:
    """Seconds to prefill ``ids`` with full attention, in pieces of the trained context length."""
    span = engine.model.config.max_positions
    pieces = [ids[i : i + span] for i in range(0, len(ids), span)]
    return sum(_timed(lambda p=p: engine.prefill(engine.new_state(mode="full"), p)) for p in pieces)


async def measure(
    docs: Sequence[tuple[str, str]], settings, engine=None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    from memllm.knowledge.chunking import TokenMap
    from memllm.knowledge.encoding import encode_document
    from memllm.knowledge.parsing import clean_text
    from memllm.knowledge.service import temporary_service

    rows = []
    with tempfile.TemporaryDirectory(prefix="memllm-bench-ingest-") as tmp:
        async with temporary_service(settings, Path(tmp), engine=engine) as svc:
            engine = svc.engine
            await svc.create_kb("bench")
            await svc.ingest_text("bench", "warm-up", WARMUP_TEXT)
            for name, text in docs:
                t0 = time.perf_counter()
                res = await svc.ingest_text("bench", name, text)
                t_ingest = time.perf_counter() - t0
                if res.status != "ready":
                    log(f"{name}: {res.status} {res.error or ''}")
                    continue
                ids, _ = TokenMap.from_tokenizer(engine.tokenizer, clean_text(text))
                assert len(ids) == res.tokens, (len(ids), res.tokens)
                t_model = await asyncio.to_thread(_timed, lambda ids=ids: encode_document(engine, ids))
                t_full = await asyncio.to_thread(full_prefill_seconds, engine, ids)
                row = {
                    "document": name,
                    "tokens": len(ids),
                    "ingest_s": t_ingest,
                    "model_read_s": t_model,
                    "full_prefill_s": t_full,
                }
                rows.append(row)
                log(_line(row))
    total = {
        "document": "all",
        "tokens": sum(r["tokens"] for r in rows),
        **{k: sum(r[k] for r in rows) for k in ("ingest_s", "model_read_s", "full_prefill_s")},
    }
    return {"machine": machine_info(), "documents": rows, "total": total}


def _line(r: dict[str, Any]) -> str:
    n = r["tokens"]
    return (
        f"{r['document']}: {n} tokens; ingest {n / r['ingest_s']:.0f} tok/s, model read "
        f"{n / r['model_read_s']:.0f} tok/s, full prefill {n / r['full_prefill_s']:.0f} tok/s"
    )


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per document and in total: tokens/s of each part and the two ratios."""
    out = []
    for r in [*result["documents"], result["total"]]:
        n = r["tokens"]
        out.append(
            {
                "document": r["document"],
                "tokens": n,
                "ingest tok/s": round(n / r["ingest_s"], 1),
                "model read tok/s": round(n / r["model_read_s"], 1),
                "full prefill tok/s": round(n / r["full_prefill_s"], 1),
                "ingest / full": round(r["full_prefill_s"] / r["ingest_s"], 3),
                "ingest / model read": round(r["model_read_s"] / r["ingest_s"], 3),
            }
        )
    return out


def run(path: Path, limit: int | None, out: Path, settings, log: Callable[[str], None] = print) -> list[dict]:
    result = asyncio.run(measure(load_documents(path, limit), settings, log=log))
    result["data"] = str(path)
    write_json(out, result)
    return table_rows(result)

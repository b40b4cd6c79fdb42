"""Helpers shared by the evaluation commands: data paths, metrics, tables, JSON output."""

from __future__ import annotations

import json
import math
import os
import re
import string
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from memllm.knowledge.analysis import stem


def eval_data_dir() -> Path:
    """``MEMLLM_EVAL_DATA`` (default ``../shared/data``)."""
    return Path(os.environ.get("MEMLLM_EVAL_DATA", "../shared/data")).expanduser()


def resolve_data(path: str | Path | None, default: str) -> Path:
    """A --data argument, or ``<eval data dir>/<default>``."""
    p = Path(path).expanduser() if path else eval_data_dir() / default
    if not p.exists():
        raise FileNotFoundError(f"evaluation data not found: {p} (set --data or MEMLLM_EVAL_DATA)")
    return p


def ndcg_at(ranked: Sequence[str], relevant: set[str], k: int = 10) -> float:
    """Binary-relevance nDCG@k (pytrec_eval / BEIR ``ndcg_cut``)."""
    dcg = sum(1.0 / math.log2(i + 2) for i, d in enumerate(ranked[:k]) if d in relevant)
    ideal = sum(1.0 / math.log2(i + 2) for i in range(min(k, len(relevant))))
    return dcg / ideal if ideal else 0.0


def recall_at(ranked: Sequence[str], relevant: set[str], k: int = 100) -> float:
    return len(set(ranked[:k]) & relevant) / len(relevant) if relevant else 0.0


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lowercase, no punctuation, no articles, single spaces."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def token_f1(prediction: str, gold: str, use_stem: bool = True) -> float:
    """Token F1 between normalised (and Porter-stemmed) answers."""
    p = normalize_answer(prediction).split()
    g = normalize_answer(gold).split()
    if use_stem:
        p, g = [stem(w) for w in p], [stem(w) for w in g]
    if not p or not g:
        return float(p == g)
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Evaluation tables: metrics with 4 decimals."""
    from memllm.bench.common import format_table as plain_table

    return plain_table(rows, columns, digits=4)


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)

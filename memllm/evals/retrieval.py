"""Retrieval evaluation on SciFact (BEIR protocol): nDCG@10 and Recall@100.

Corpus: ``corpus_train.csv`` (doc_id, title, abstract as a numpy-style list of quoted sentences).
Queries: a claims file (``claims_train.csv`` by default; ``--claims`` picks another in the same
format). Qrels: each claim's ``cited_doc_ids`` (relevance 1). Document text = title + abstract.

Rows:
  ``embeddings``  all-MiniLM-L6-v2 cosine over the whole corpus
  ``bm25``        BM25 (bm25s, Porter stems: memllm/knowledge/lexical.py) over the whole corpus
  ``hybrid``      min-max score fusion of both (memllm/knowledge/ranking.py)
  ``memory-knn``  the model's own memory: the documents are ingested through the model into a
                  knowledge base (memory mode, persisted blocks); a claim is read through the model
                  in memory mode and documents are ranked by the attention mass their blocks drew
                  (kNN retrieval at every memory layer). Costly (the model reads every document),
                  so it runs on a subset corpus (the first ``--memory-queries`` claims' cited
                  documents plus random distractors up to ``--memory-docs``); embeddings and hybrid
                  are also reported on that subset so the rows compare.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import random
import sys
import time
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from memllm.evals.common import format_table, ndcg_at, recall_at
from memllm.knowledge.ranking import (
    DEFAULT_ALPHA,
    DEFAULT_DEPTH,
    DEFAULT_FUSION,
    HybridIndex,
    fuse,
    top_indices,
)


@dataclass
class RetrievalData:
    doc_ids: list[str]
    texts: list[str]
    queries: dict[str, str]  # qid -> claim, in file order
    qrels: dict[str, set[str]]  # qid -> relevant doc ids


def parse_sentence_list(field: str) -> list[str]:
    """``['a.'\\n 'b.']`` (numpy repr, no commas) -> ['a.', 'b.']; a plain string is one sentence."""
    field = field.strip()
    if not field.startswith("["):
        return [field] if field else []
    out = []
    try:
        for tok in tokenize.generate_tokens(io.StringIO(field).readline):
            if tok.type == tokenize.STRING:
                out.append(ast.literal_eval(tok.string))
    except (tokenize.TokenError, SyntaxError, ValueError):
        return [field.strip("[]")]
    return out


def _ids(field: str) -> list[str]:
    field = field.strip()
    if not field:
        return []
    try:
        value = ast.literal_eval(field)
    except (SyntaxError, ValueError):
        return [x for x in field.strip("[]").replace(",", " ").split() if x]
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    return [str(value)]


def load_scifact(data: Path, claims: Path | None = None) -> RetrievalData:
    data = Path(data)
    corpus_file = data / "corpus_train.csv" if data.is_dir() else data
    claims_file = Path(claims) if claims else corpus_file.parent / "claims_train.csv"
    csv.field_size_limit(sys.maxsize)
    doc_ids, texts = [], []
    with open(corpus_file, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            sents = parse_sentence_list(row.get("abstract", ""))
            title = (row.get("title") or "").strip()
            doc_ids.append(str(row["doc_id"]).strip())
            texts.append((title + " " + " ".join(sents)).strip())
    queries: dict[str, str] = {}
    qrels: dict[str, set[str]] = {}
    with open(claims_file, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            qid = str(row["id"]).strip()
            cited = _ids(row.get("cited_doc_ids", ""))
            if not cited:
                continue
            queries.setdefault(qid, row["claim"].strip())
            qrels.setdefault(qid, set()).update(cited)
    known = set(doc_ids)
    for qid in list(qrels):
        qrels[qid] &= known
        if not qrels[qid]:
            del qrels[qid], queries[qid]
    return RetrievalData(doc_ids, texts, queries, qrels)


def corpus_embeddings(texts: list[str], cache_dir: Path | None, embedder, part: int = 512) -> np.ndarray:
    """Embeddings of the corpus, cached on disk by content hash (the embedder is deterministic).

    Computed in parts of ``part`` texts, each saved as it completes, so an interrupted run resumes.
    """
    h = hashlib.sha256("\x1e".join(texts).encode()).hexdigest()[:16]
    path = cache_dir / f"corpus-{h}-{embedder.name}.npy" if cache_dir else None
    if path is not None and path.is_file():
        vecs = np.load(path)
        if vecs.shape[0] == len(texts):
            return vecs
    t0 = time.perf_counter()
    parts = []
    for i, start in enumerate(range(0, len(texts), part)):
        ppath = path.with_name(f"{path.stem}.part{i:03d}.npy") if path is not None else None
        if ppath is not None and ppath.is_file():
            parts.append(np.load(ppath))
            continue
        vec = embedder.encode(texts[start : start + part])
        if ppath is not None:
            ppath.parent.mkdir(parents=True, exist_ok=True)
            np.save(ppath, vec)
        parts.append(vec)
        done = start + len(vec)
        print(f"embedded {done}/{len(texts)} documents ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    vecs = np.concatenate(parts)
    if path is not None:
        np.save(path, vecs)
        for p in path.parent.glob(f"{path.stem}.part*.npy"):
            p.unlink()
    return vecs


def score_rankings(rankings: dict[str, list[str]], qrels: dict[str, set[str]]) -> dict[str, float]:
    qids = list(rankings)
    return {
        "ndcg@10": float(np.mean([ndcg_at(rankings[q], qrels[q], 10) for q in qids])) if qids else 0.0,
        "recall@100": float(np.mean([recall_at(rankings[q], qrels[q], 100) for q in qids])) if qids else 0.0,
        "queries": len(qids),
    }


def rank_all(
    index: HybridIndex, doc_ids: list[str], queries: dict[str, str], qvecs: np.ndarray, method: str, **fusion: Any
) -> dict[str, list[str]]:
    out = {}
    for (qid, claim), qv in zip(queries.items(), qvecs, strict=True):
        ranked = index.rank(claim, qv, 100, method, **fusion)
        out[qid] = [doc_ids[r.index] for r in ranked]
    return out


def sweep(index: HybridIndex, data: RetrievalData, qvecs: np.ndarray) -> list[dict[str, Any]]:
    """nDCG@10 of hybrid fusions over a grid (for tuning the defaults)."""
    dense_all = [index.dense_scores(v) for v in qvecs]
    bm_all = [index.bm25.scores(c) for c in data.queries.values()]
    rows = []
    for method, alphas in (("minmax", (0.3, 0.4, 0.5, 0.6, 0.7)), ("rrf", (0.3, 0.5, 0.7))):
        for alpha in alphas:
            for depth in (100, 1000) if method == "minmax" else (100,):
                rankings = {}
                for qid, d, b in zip(data.queries, dense_all, bm_all, strict=True):
                    ranked = fuse(d, b, 100, method=method, alpha=alpha, depth=depth)
                    rankings[qid] = [data.doc_ids[r.index] for r in ranked]
                m = score_rankings(rankings, data.qrels)
                rows.append({"fusion": method, "alpha": alpha, "depth": depth, **m})
    return rows


def memory_subset(data: RetrievalData, n_queries: int, n_docs: int, seed: int = 0) -> tuple[list[int], list[str]]:
    """(corpus indices, query ids): the first n_queries claims, their cited documents and random
    distractors up to n_docs documents."""
    qids = list(data.queries)[:n_queries]
    pos = {d: i for i, d in enumerate(data.doc_ids)}
    chosen = sorted({pos[d] for q in qids for d in data.qrels[q]})
    rng = random.Random(seed)
    others = [i for i in range(len(data.doc_ids)) if i not in set(chosen)]
    rng.shuffle(others)
    chosen = sorted(chosen + others[: max(0, n_docs - len(chosen))])
    return chosen, qids


def run(
    data_path: Path,
    claims: Path | None = None,
    *,
    limit: int | None = None,
    settings=None,
    memory_docs: int = 0,
    memory_queries: int = 20,
    do_sweep: bool = False,
    fusion: str = DEFAULT_FUSION,
    alpha: float = DEFAULT_ALPHA,
    depth: int = DEFAULT_DEPTH,
    embedder=None,
    service_factory=None,
) -> dict[str, Any]:
    """Run the evaluation; returns {"rows": [...], "sweep": [...], "config": {...}}."""
    from memllm.knowledge.embeddings import Embedder
    from memllm.settings import get_settings

    settings = settings or get_settings()
    embedder = embedder or Embedder()
    data = load_scifact(data_path, claims)
    if limit:
        keep = list(data.queries)[:limit]
        data.queries = {q: data.queries[q] for q in keep}
        data.qrels = {q: data.qrels[q] for q in keep}
    cache = Path(settings.data_dir) / "eval-cache"
    t0 = time.perf_counter()
    vecs = corpus_embeddings(data.texts, cache, embedder)
    t_index = time.perf_counter()
    index = HybridIndex(data.texts, vecs)  # the BM25 index is built here; the embeddings only copied
    index_s = time.perf_counter() - t_index
    qvecs = embedder.encode(list(data.queries.values()))
    build_s = time.perf_counter() - t0
    fusion_args = {"fusion": fusion, "alpha": alpha, "depth": depth}
    rows = []
    for method in ("embeddings", "bm25", "hybrid"):
        t1 = time.perf_counter()
        rankings = rank_all(index, data.doc_ids, data.queries, qvecs, method, **fusion_args)
        m = score_rankings(rankings, data.qrels)
        rows.append({"method": method, "corpus": len(data.doc_ids), **m, "seconds": time.perf_counter() - t1})
    result: dict[str, Any] = {
        "config": {
            "data": str(data_path),
            "claims": str(claims) if claims else "claims_train.csv",
            "limit": limit,
            **fusion_args,
            "index_build_seconds": build_s,
            "hybrid_index_seconds": index_s,
        },
        "rows": rows,
    }
    if do_sweep:
        result["sweep"] = sweep(index, data, qvecs)
    if memory_docs:
        result["rows"].extend(
            memory_rows(data, index, qvecs, settings, memory_docs, memory_queries, fusion_args, service_factory)
        )
    return result


def memory_rows(
    data: RetrievalData,
    index: HybridIndex,
    qvecs: np.ndarray,
    settings,
    n_docs: int,
    n_queries: int,
    fusion_args: dict[str, Any],
    service_factory=None,
) -> list[dict[str, Any]]:
    """embeddings / hybrid / memory-knn on the subset corpus (see module docstring)."""
    import asyncio
    import tempfile

    from memllm.knowledge.service import temporary_service

    chosen, qids = memory_subset(data, n_queries, n_docs)
    sub_ids = [data.doc_ids[i] for i in chosen]
    sub_texts = [data.texts[i] for i in chosen]
    sub_index = HybridIndex(sub_texts, index.embeddings[chosen])
    qpos = {q: i for i, q in enumerate(data.queries)}
    sub_queries = {q: data.queries[q] for q in qids}
    sub_qvecs = qvecs[[qpos[q] for q in qids]]
    rows = []
    for method in ("embeddings", "hybrid"):
        rankings = rank_all(sub_index, sub_ids, sub_queries, sub_qvecs, method, **fusion_args)
        rows.append({"method": f"{method} (subset)", "corpus": len(sub_ids), **score_rankings(rankings, data.qrels)})

    async def memory() -> tuple[dict[str, list[str]], dict[str, float]]:
        with tempfile.TemporaryDirectory(prefix="memllm-eval-") as tmp:
            factory = service_factory or temporary_service
            async with factory(settings, Path(tmp)) as svc:
                kb = await svc.create_kb("scifact-eval")
                t0 = time.perf_counter()
                report = await svc.ingest_texts(
                    kb.name,
                    [(doc_id, text, {}) for doc_id, text in zip(sub_ids, sub_texts, strict=True)],
                    progress=True,
                )
                ingest_s = time.perf_counter() - t0
                rankings = {}
                t1 = time.perf_counter()
                for qid, claim in sub_queries.items():
                    ranked = await svc.memory_rank(kb.name, claim, k=100)
                    rankings[qid] = [name for name, _ in ranked]
                stats = {
                    "ingest_seconds": ingest_s,
                    "ingest_tokens": report.tokens,
                    "query_seconds": time.perf_counter() - t1,
                }
                return rankings, stats

    rankings, stats = asyncio.run(memory())
    rows.append(
        {"method": "memory-knn (subset)", "corpus": len(sub_ids), **score_rankings(rankings, data.qrels), **stats}
    )
    return rows


def print_result(result: dict[str, Any]) -> str:
    cols = ["method", "corpus", "queries", "ndcg@10", "recall@100", "seconds"]
    text = format_table(result["rows"], cols)
    if "hybrid_index_seconds" in result.get("config", {}):
        text += f"\n\nhybrid index (BM25) built in {result['config']['hybrid_index_seconds']:.2f} s"
    if "sweep" in result:
        text += "\n\nhybrid fusion sweep (nDCG@10):\n" + format_table(
            result["sweep"], ["fusion", "alpha", "depth", "ndcg@10", "recall@100"]
        )
    return text


__all__ = ["load_scifact", "print_result", "run", "top_indices"]

"""``memllm eval ...``: evaluation commands (print a table, write JSON).

Register into the main CLI with::

    from memllm.evals.cli import eval_group
    cli.add_command(eval_group)          # command name "eval"

Data paths default to ``MEMLLM_EVAL_DATA`` (``../shared/data``).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from memllm.evals.common import resolve_data, write_json
from memllm.knowledge.cli import _errors


@click.group("eval")
def eval_group() -> None:
    """Evaluations on public data (retrieval, long documents)."""


def _settings():
    from memllm.settings import get_settings

    return get_settings()


@eval_group.command("retrieval")
@click.option(
    "--data", default=None, help="SciFact folder (corpus_train.csv, claims_train.csv) [default: <eval data>/scifact]"
)
@click.option("--claims", type=click.Path(path_type=Path), default=None, help="another claims file, same format")
@click.option("--limit", type=int, default=None, help="first N claims only")
@click.option(
    "--memory-docs",
    type=int,
    default=0,
    show_default=True,
    help="also rank with the model's memory (kNN) over a subset corpus of this many documents",
)
@click.option("--memory-queries", type=int, default=20, show_default=True, help="claims used for the memory row")
@click.option("--sweep", "do_sweep", is_flag=True, help="also print a sweep of hybrid fusion settings")
@click.option("--fusion", type=click.Choice(["minmax", "rrf"]), default=None)
@click.option("--alpha", type=float, default=None, help="weight of the embeddings in hybrid fusion")
@click.option("--out", type=click.Path(path_type=Path), default=Path("eval-results/retrieval.json"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of the table")
@_errors
def retrieval_cmd(data, claims, limit, memory_docs, memory_queries, do_sweep, fusion, alpha, out, as_json):
    """SciFact retrieval (BEIR protocol): nDCG@10 and Recall@100 for embeddings, BM25, hybrid, memory-kNN."""
    from memllm.evals import retrieval
    from memllm.knowledge.ranking import DEFAULT_ALPHA, DEFAULT_FUSION

    path = resolve_data(data, "scifact")
    result = retrieval.run(
        path,
        claims,
        limit=limit,
        settings=_settings(),
        memory_docs=memory_docs,
        memory_queries=memory_queries,
        do_sweep=do_sweep,
        fusion=fusion or DEFAULT_FUSION,
        alpha=DEFAULT_ALPHA if alpha is None else alpha,
    )
    write_json(out, result)
    click.echo(json.dumps(result, indent=2, default=str) if as_json else retrieval.print_result(result))
    if not as_json:
        click.echo(f"wrote {out}")


@eval_group.command("longdoc")
@click.option("--data", default=None, help="an L-Eval .jsonl file [default: <eval data>/leval/quality.jsonl]")
@click.option("--limit", type=int, default=1, show_default=True, help="first N documents (0 = all)")
@click.option("--offset", type=click.IntRange(min=0), default=0, show_default=True, help="skip the first N documents")
@click.option("--questions", type=int, default=5, show_default=True, help="questions per document (0 = all)")
@click.option("--modes", default=",".join(("memory", "rag", "hybrid", "truncation")), show_default=True)
@click.option("--max-chars", type=int, default=None, help="skip documents longer than this (quick runs)")
@click.option("--context", type=int, default=8192, show_default=True, help="tokens of the truncation baseline")
@click.option(
    "--choice",
    type=click.Choice(["letters", "free"]),
    default="letters",
    show_default=True,
    help="multiple choice: the answer's first token constrained to A-D, or free text",
)
@click.option("--out", type=click.Path(path_type=Path), default=Path("eval-results/longdoc.json"), show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of the table")
@_errors
def longdoc_cmd(data, limit, offset, questions, modes, max_chars, context, choice, out, as_json):
    """L-Eval long-document QA: memory, rag, hybrid and a truncation baseline."""
    from memllm.evals import longdoc

    path = resolve_data(data, "leval/quality.jsonl")
    chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
    bad = [m for m in chosen if m not in longdoc.MODES]
    if bad:
        raise click.BadParameter(f"unknown modes {bad}; choose from {longdoc.MODES}", param_hint="--modes")
    result = longdoc.run(
        path,
        settings=_settings(),
        limit=limit or None,
        offset=offset,
        questions=questions or None,
        modes=chosen,
        context=context,
        max_chars=max_chars,
        choice=choice,
        log=(lambda msg: click.echo(msg, err=True)),
    )
    write_json(out, result)
    click.echo(json.dumps(result, indent=2, default=str) if as_json else longdoc.print_result(result))
    if not as_json:
        click.echo(f"wrote {out}")


@eval_group.command("longdoc-merge")
@click.argument("results", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), default=Path("eval-results/longdoc.json"), show_default=True)
@_errors
def longdoc_merge_cmd(results, out):
    """Merge ``eval longdoc`` runs over disjoint documents of one file (e.g. ``--offset 0 --limit 9``
    and ``--offset 9 --limit 0`` run side by side) into one result: the table over all questions."""
    from memllm.evals import longdoc

    try:
        merged = longdoc.merge([json.loads(p.read_text()) for p in results])
    except (ValueError, KeyError, json.JSONDecodeError) as exc:
        raise click.ClickException(f"cannot merge: {exc}") from exc
    write_json(out, merged)
    click.echo(longdoc.print_result(merged))
    click.echo(f"wrote {out}")


__all__ = ["eval_group"]

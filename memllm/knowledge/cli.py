"""Command line for knowledge bases: ``ingest``, ``ask``, ``search``, ``summarize`` and ``kb ...``.

Register into the main CLI with::

    from memllm.knowledge.cli import ask, ingest, kb, search, summarize
    for command in (ingest, ask, search, summarize, kb):
        cli.add_command(command)

The database is ``MEMLLM_DATABASE_URL`` (default: SQLite in ``MEMLLM_DATA_DIR``); it must be
migrated first (``memllm db upgrade``).
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from memllm.cli_common import CliError, friendly_errors

DEMO_DIR = Path(__file__).resolve().parent / "demo"


KnowledgeCliError = CliError

# Expected failures print one line (``memllm: error: ...``) and exit 1; -v shows tracebacks.
_errors = friendly_errors(on_interrupt="interrupted (already ingested documents are kept; run again to resume)")


def _settings():
    from memllm.settings import get_settings

    return get_settings()


def _engine(settings):
    from memllm.engine import Engine
    from memllm.loading import load_model

    return Engine(load_model(settings), settings.memory, retrieval=settings.retrieval)


def _run(coro_fn, need_model: bool):
    from memllm.knowledge.service import KnowledgeService

    settings = _settings()
    engine = _engine(settings) if need_model else None

    async def main():
        async with KnowledgeService.open(settings, engine) as svc:
            return await coro_fn(svc)

    return asyncio.run(main())


def _parse_meta(items: tuple[str, ...]) -> dict[str, str]:
    meta = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--meta")
        meta[key] = value
    return meta


def _print_citations(citations, header: str = "sources") -> None:
    if not citations:
        return
    click.echo(f"\n{header}:")
    for i, c in enumerate(citations, 1):
        snippet = " ".join(c.snippet.split())
        click.echo(
            f"  [{i}] {c.source_name} (doc {c.document_id}, chunk {c.chunk_ordinal}, "
            f"chars {c.char_start}-{c.char_end}, score {c.score:.3f})"
        )
        click.echo(f"      {snippet[:160]}")


# ---------------------------------------------------------------------------------------- ingest
@click.command("ingest")
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@click.option("--kb", "kb_name", required=True, help="knowledge base name (created if missing)")
@click.option("--include", multiple=True, help="glob of files to take from directories (repeatable)")
@click.option("--exclude", multiple=True, help="glob of files to leave out (repeatable)")
@click.option("--no-recursive", is_flag=True, help="do not descend into subdirectories")
@click.option("--text", default=None, help="ingest this raw text instead of files ('-' reads stdin)")
@click.option("--name", default=None, help="source name for --text (default: 'text')")
@click.option("--meta", multiple=True, help="KEY=VALUE metadata for --text (repeatable)")
@click.option("--text-field", default=None, help="JSON/JSONL field holding the text (default: text, content, body...)")
@click.option("--max-mb", default=50.0, show_default=True, help="skip files larger than this")
@click.option("--quiet", is_flag=True, help="no progress bars")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@_errors
def ingest(paths, kb_name, include, exclude, no_recursive, text, name, meta, text_field, max_mb, quiet, as_json):
    """Read documents into a knowledge base: files, directories (recursive) or --text.

    Unchanged documents are skipped (content hash), changed ones replace the old version, bad
    files are reported and skipped; re-running an interrupted ingestion resumes it.
    """
    if not paths and text is None:
        raise click.UsageError("give files/directories to ingest, or --text")
    if text == "-":
        text = sys.stdin.read()
    progress = not quiet and not as_json

    async def work(svc):
        svc.max_bytes = int(max_mb * 1024 * 1024)
        await svc.create_kb(kb_name, exist_ok=True)
        if text is not None:
            return await svc.ingest_texts(kb_name, [(name or "text", text, _parse_meta(meta))], progress=progress)
        return await svc.ingest_paths(
            kb_name,
            list(paths),
            include=include,
            exclude=exclude,
            recursive=not no_recursive,
            text_field=text_field,
            progress=progress,
        )

    report = _run(work, need_model=True)
    if as_json:
        import dataclasses

        click.echo(
            json.dumps(
                {
                    "results": [dataclasses.asdict(r) for r in report.results],
                    "seconds": report.seconds,
                    "tokens": report.tokens,
                },
                indent=2,
            )
        )
        return
    rate = report.tokens / report.seconds if report.seconds else 0.0
    click.echo(
        f"{report.count('ready')} ingested, {report.count('skipped')} unchanged (skipped), "
        f"{report.count('error')} failed; {report.tokens} tokens in {report.seconds:.1f} s ({rate:.0f} tok/s)"
    )
    for r in report.errors:
        click.echo(f"  error: {r.error}", err=True)


# ------------------------------------------------------------------------------------------- ask
@click.command("ask")
@click.argument("question")
@click.option("--kb", "kb_name", required=True, help="knowledge base name")
@click.option("--mode", type=click.Choice(["memory", "rag", "hybrid"]), default="hybrid", show_default=True)
@click.option("-k", "--k", "k", default=4, show_default=True, help="chunks in the prompt (rag, hybrid)")
@click.option("--candidates", default=16, show_default=True, help="chunks whose blocks memory may retrieve")
@click.option(
    "--restrict",
    type=click.Choice(["candidates", "documents", "none"]),
    default="candidates",
    show_default=True,
    help="which blocks memory attention may retrieve",
)
@click.option("--max-tokens", default=128, show_default=True)
@click.option("--temperature", default=0.0, show_default=True)
@click.option("--trace/--no-trace", default=True, show_default=True, help="show the memory trace")
@click.option("--json", "as_json", is_flag=True, help="print the answer, citations and trace as JSON")
@_errors
def ask(question, kb_name, mode, k, candidates, restrict, max_tokens, temperature, trace, as_json):
    """Answer QUESTION from a knowledge base, with citations and the memory trace."""
    streamed = not as_json

    async def work(svc):
        return await svc.ask(
            kb_name,
            question,
            mode=mode,
            k=k,
            candidates_k=candidates,
            restrict=restrict,
            max_tokens=max_tokens,
            temperature=temperature,
            on_text=(lambda piece: click.echo(piece, nl=False)) if streamed else None,
        )

    answer = _run(work, need_model=True)
    if as_json:
        click.echo(json.dumps(answer.as_dict(), indent=2))
        return
    click.echo()
    _print_citations(answer.citations)
    if trace and answer.trace:
        click.echo("\nmemory trace (blocks that drew the most attention):")
        for t in answer.trace:
            where = f"{t.source_name} chunk {t.citation.chunk_ordinal}" if t.citation else f"doc {t.document_id}"
            click.echo(
                f"  block {t.block_id}: {t.attention:6.1%} of memory attention, tokens "
                f"{t.token_start}-{t.token_end} -> {where}"
            )


# ---------------------------------------------------------------------------------------- search
@click.command("search")
@click.argument("query")
@click.option("--kb", "kb_name", required=True, help="knowledge base name")
@click.option("-k", "--k", "k", default=8, show_default=True)
@click.option("--method", type=click.Choice(["hybrid", "embeddings", "bm25"]), default="hybrid", show_default=True)
@click.option("--json", "as_json", is_flag=True)
@_errors
def search(query, kb_name, k, method, as_json):
    """Ranked chunks for QUERY (retrieval only, no generation)."""
    hits = _run(lambda svc: svc.search(kb_name, query, k=k, method=method), need_model=False)
    if as_json:
        click.echo(json.dumps([h.as_dict() for h in hits], indent=2))
    elif not hits:
        click.echo("no results")
    else:
        _print_citations(hits, header=f"{len(hits)} results ({method})")


# ------------------------------------------------------------------------------------- summarize
@click.command("summarize")
@click.option("--kb", "kb_name", required=True, help="knowledge base name")
@click.option("--doc", "doc", required=True, help="document id or source name")
@click.option("--section-tokens", default=1024, show_default=True, help="tokens per section (map step)")
@click.option("--max-tokens", default=120, show_default=True, help="tokens per section summary")
@click.option("--json", "as_json", is_flag=True)
@_errors
def summarize(kb_name, doc, section_tokens, max_tokens, as_json):
    """Summarize a whole document (map-reduce over its memory), with the passages each part used."""
    summary = _run(
        lambda svc: svc.summarize(kb_name, doc, section_tokens=section_tokens, max_tokens=max_tokens), need_model=True
    )
    if as_json:
        click.echo(json.dumps(summary.as_dict(), indent=2))
        return
    click.echo(f"{summary.source_name}:\n{summary.text}")
    if len(summary.parts) > 1:
        for i, p in enumerate(summary.parts, 1):
            click.echo(f"\nsection {i} (chars {p.char_start}-{p.char_end}): {p.text}")
            _print_citations(p.passages, header="  drew on")
    else:
        _print_citations(summary.parts[0].passages, header="drew on")


# -------------------------------------------------------------------------------------- kb group
@click.group("kb")
def kb() -> None:
    """Knowledge bases: create, list, delete, documents."""


@kb.command("create")
@click.argument("name")
@click.option("--description", default="")
@_errors
def kb_create(name, description):
    """Create knowledge base NAME."""
    row = _run(lambda svc: svc.create_kb(name, description), need_model=False)
    click.echo(f"created knowledge base {row.name!r} (id {row.id})")


@kb.command("list")
@click.option("--json", "as_json", is_flag=True)
@_errors
def kb_list(as_json):
    """List knowledge bases with document, block and token counts."""
    infos = _run(lambda svc: svc.list_kbs(), need_model=False)
    if as_json:
        import dataclasses

        click.echo(json.dumps([dataclasses.asdict(i) for i in infos], indent=2))
        return
    if not infos:
        click.echo("no knowledge bases (create one with `memllm kb create NAME`)")
    for i in infos:
        click.echo(
            f"{i.id:>4}  {i.name:<24} {i.ready}/{i.documents} documents ready, {i.blocks} memory blocks, "
            f"{i.tokens} tokens  {i.description}"
        )


@kb.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@_errors
def kb_delete(name, yes):
    """Delete knowledge base NAME with all its documents and memory."""
    if not yes:
        click.confirm(f"delete knowledge base {name!r} and all its documents?", abort=True)
    gone = _run(lambda svc: svc.delete_kb(name), need_model=False)
    if not gone:
        raise KnowledgeCliError(f"knowledge base {name!r} not found")
    click.echo(f"deleted {name!r}")


@kb.command("docs")
@click.argument("name")
@click.option("--delete", "delete_doc", default=None, help="delete this document (id or source name)")
@click.option("--json", "as_json", is_flag=True)
@_errors
def kb_docs(name, delete_doc, as_json):
    """List the documents of knowledge base NAME (status, tokens), or --delete one."""
    if delete_doc is not None:
        ok = _run(lambda svc: svc.delete_document(name, delete_doc), need_model=False)
        if not ok:
            raise KnowledgeCliError(f"document {delete_doc!r} not found in {name!r}")
        click.echo(f"deleted document {delete_doc!r}")
        return
    docs = _run(lambda svc: svc.list_documents(name), need_model=False)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "id": d.id,
                        "source_name": d.source_name,
                        "status": d.status,
                        "error": d.error,
                        "tokens": d.token_count,
                        "chars": d.char_count,
                        "sha256": d.sha256,
                        "media_type": d.media_type,
                    }
                    for d in docs
                ],
                indent=2,
            )
        )
        return
    if not docs:
        click.echo("no documents")
    for d in docs:
        extra = f"  error: {d.error}" if d.error else ""
        click.echo(f"{d.id:>5}  {d.status:<8} {d.token_count:>7} tok  {d.source_name}{extra}")


@kb.command("demo")
@click.option("--name", default="demo", show_default=True)
@_errors
def kb_demo(name):
    """Create knowledge base NAME from the bundled sample document about memllm."""

    async def work(svc):
        await svc.create_kb(name, "memllm's own sample document", exist_ok=True)
        return await svc.ingest_paths(name, [DEMO_DIR], progress=True)

    report = _run(work, need_model=True)
    click.echo(
        f"{report.count('ready')} ingested, {report.count('skipped')} unchanged; try:\n"
        f'  memllm ask --kb {name} "How does memllm remember documents?"'
    )


__all__ = ["ask", "ingest", "kb", "search", "summarize"]

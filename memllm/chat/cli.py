"""``memllm chat`` (interactive, streamed; ``--session NAME`` persists it) and ``memllm sessions ...``.

Register in the main CLI with::

    from memllm.chat.cli import chat, sessions
    cli.add_command(chat)       # replaces the in-process chat command
    cli.add_command(sessions)

The database is ``MEMLLM_DATABASE_URL`` (default: SQLite in ``MEMLLM_DATA_DIR``); it must be
migrated (``memllm db upgrade``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from pathlib import Path

import click

from memllm.cli_common import CliError, _engine, _sampling, friendly_errors, sampling_options
from memllm.settings import get_settings


@contextlib.asynccontextmanager
async def _service(with_model: bool = True):
    from memllm.chat.service import ChatService
    from memllm_storage.store import MemoryStore

    settings = get_settings()
    store = await MemoryStore.from_settings(settings)
    svc = None
    try:
        svc = ChatService(_engine(settings) if with_model else None, store)
        yield svc
    finally:
        if svc is not None:
            await svc.close()  # spills the session's live state: the next chat restores it
        await store.close()


def _run(coro):
    from memllm.chat.service import ChatError
    from memllm_storage.migrate import DatabaseNotMigratedError

    try:
        return asyncio.run(coro)
    except (ChatError, DatabaseNotMigratedError) as exc:
        raise CliError(str(exc)) from exc


@click.command("chat")
@click.option("--session", "session_name", default=None, help="keep the chat in session NAME (created if missing)")
@click.option("--system", default=None, help="system prompt (a new session or an unsaved chat)")
@click.option("--kb", "kb_ids", multiple=True, type=int, help="knowledge base id a new session consults (repeatable)")
@click.option("--trace", is_flag=True, help="after each reply, show the memory blocks it attended to most")
@click.option(
    "--mode",
    type=click.Choice(["memory", "window", "full"]),
    default=None,
    help="attention mode (sessions: memory or window)",
)
@sampling_options
@friendly_errors
def chat(
    session_name: str | None, system: str | None, kb_ids: tuple[int, ...], trace: bool, mode: str | None, **sampling
) -> None:
    """Interactive multi-turn chat, streamed (empty line or Ctrl-D to quit).

    With --session the chat is persisted: every turn is saved, and a reply attends over the recent
    turns plus kNN-retrieved memory of every earlier turn, across restarts.
    """
    params = _sampling(**sampling)
    if session_name is None:
        _chat_unsaved(system, mode, params)
        return
    _run(_chat_session(session_name, system, kb_ids, trace, mode, params))


def _read_line() -> str | None:
    try:
        return click.prompt("you", prompt_suffix="> ", default="", show_default=False)
    except (EOFError, click.exceptions.Abort):
        return None


def _chat_unsaved(system: str | None, mode: str | None, params) -> None:
    from memllm.conversation import Conversation
    from memllm.settings import chat_memory_changes, get_settings

    engine = _engine()
    conv = Conversation(engine, engine.new_state(mode, **chat_memory_changes(get_settings())), system=system)
    click.echo(f"memllm chat ({engine.loaded.name}, {conv.state.mode} attention, not saved). Empty line to quit.")
    while (user := _read_line()) and user.strip():
        click.echo("bot> ", nl=False)
        for piece in conv.reply(user, params):
            click.echo(piece, nl=False)
        click.echo()


async def _chat_session(name, system, kb_ids, trace, mode, params) -> None:
    from memllm.chat.service import ChatService

    async with _service() as default:
        svc = default
        if mode is not None and mode != svc.mode:
            svc = ChatService(svc.engine, svc.store, mode=mode)
        try:
            await _chat_loop(svc, name, system, kb_ids, trace, params)
        finally:
            if svc is not default:
                await svc.close()


async def _chat_loop(svc, name, system, kb_ids, trace, params) -> None:
    """Create or find session ``name``, then read lines and stream replies until an empty line."""
    info = await svc.find(name)
    if info is None:
        info = await svc.create(name, system=system, kb_ids=kb_ids)
        click.echo(f"created session {info.name!r} (#{info.id})")
    elif system or kb_ids:
        click.echo("note: --system / --kb apply to new sessions only", err=True)
    click.echo(
        f"session {info.name!r}: {info.message_count} messages, {info.token_count} tokens "
        f"({svc.engine.loaded.name}, {svc.mode} attention). Empty line to quit."
    )
    while (user := _read_line()) and user.strip():
        click.echo("bot> ", nl=False)
        turn = svc.turn(info.id, user, params, trace=trace)
        async for piece in turn.stream():
            click.echo(piece, nl=False)
        click.echo()
        if trace and turn.result is not None:
            _print_trace(turn.result)


def _print_trace(result) -> None:
    r = result
    click.echo(
        f"  [{r.prompt_tokens} prompt + {r.completion_tokens} tokens, first token {r.ttft_s or 0:.2f} s, "
        f"{r.total_s:.2f} s]",
        err=True,
    )
    for e in r.trace[:5]:
        where = f"message {e.message_id}" if e.message_id else (f"chunk {e.chunk_id}" if e.chunk_id else "this turn")
        click.echo(
            f"  memory {e.source} block {e.block_id} ({where}, tokens {e.token_start}-{e.token_end}): "
            f"mass {e.mass:.2f}",
            err=True,
        )
    for c in r.citations[:3]:
        click.echo(f"  cites {c.source_name} (kb {c.kb_id}, chunk {c.chunk_id})", err=True)


@click.group("sessions")
def sessions() -> None:
    """Chat sessions: create, list, show, delete, export, import."""


@sessions.command("create")
@click.argument("name")
@click.option("--system", default=None, help="system prompt (the session's first message)")
@click.option("--kb", "kb_ids", multiple=True, type=int, help="knowledge base id to consult (repeatable)")
@friendly_errors
def create_cmd(name: str, system: str | None, kb_ids: tuple[int, ...]) -> None:
    """Create session NAME."""

    async def go():
        async with _service(with_model=bool(system)) as svc:
            info = await svc.create(name, system=system, kb_ids=kb_ids)
            click.echo(f"created session {info.name!r} (#{info.id})")

    _run(go())


@sessions.command("list")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def list_cmd(as_json: bool) -> None:
    """Every session: id, name, messages, tokens, last update."""

    async def go():
        async with _service(with_model=False) as svc:
            items = await svc.list()
        if as_json:
            click.echo(json.dumps([i.as_dict() for i in items], indent=2))
            return
        if not items:
            click.echo("no sessions")
        for i in items:
            updated = i.updated_at.strftime("%Y-%m-%d %H:%M") if i.updated_at else "-"
            click.echo(f"#{i.id:<5} {i.name:<24} {i.message_count:>6} messages {i.token_count:>9} tokens  {updated}")

    _run(go())


@sessions.command("show")
@click.argument("name")
@click.option("--limit", default=20, show_default=True, help="messages per page")
@click.option("--before", type=int, default=None, help="show messages before this ordinal (page back)")
@click.option("--json", "as_json", is_flag=True)
@friendly_errors
def show_cmd(name: str, limit: int, before: int | None, as_json: bool) -> None:
    """A page of session NAME's history (latest first page; --before N pages back)."""

    async def go():
        async with _service(with_model=False) as svc:
            info = await svc.resolve(name)
            page = await svc.history(info.id, limit=limit, before=before)
        if as_json:
            click.echo(json.dumps({"session": info.as_dict(), "messages": [m.as_dict() for m in page]}, indent=2))
            return
        click.echo(f"session {info.name!r} (#{info.id}): {info.message_count} messages, {info.token_count} tokens")
        for m in page:
            click.echo(f"[{m.ordinal}] {m.role}: {m.content}")
        if page and page[0].ordinal > 0:
            click.echo(f"(older: --before {page[0].ordinal})")

    _run(go())


@sessions.command("delete")
@click.argument("name")
@click.option("--yes", is_flag=True, help="do not ask")
@friendly_errors
def delete_cmd(name: str, yes: bool) -> None:
    """Delete session NAME and everything it remembers (messages, memory blocks, vectors)."""

    async def go():
        async with _service(with_model=False) as svc:
            info = await svc.resolve(name)
            if not yes:
                click.confirm(f"delete session {info.name!r} and its {info.message_count} messages?", abort=True)
            await svc.delete(info.id)
            click.echo(f"deleted session {info.name!r}")

    _run(go())


@sessions.command("export")
@click.argument("name")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None, help="file (default: stdout)")
@friendly_errors
def export_cmd(name: str, output: Path | None) -> None:
    """Session NAME as JSON (its messages; memory is rebuilt on import)."""

    async def go():
        async with _service(with_model=False) as svc:
            data = await svc.export((await svc.resolve(name)).id)
        text = json.dumps(data, indent=2, ensure_ascii=False)
        if output is None:
            click.echo(text)
        else:
            output.write_text(text + "\n")
            click.echo(f"wrote {output} ({len(data['messages'])} messages)", err=True)

    _run(go())


@sessions.command("import")
@click.argument("file", type=click.Path(path_type=Path, allow_dash=True))
@click.option("--name", default=None, help="name of the new session (default: the exported name)")
@friendly_errors
def import_cmd(file: Path, name: str | None) -> None:
    """Create a session from an export FILE ("-" for stdin), reading its messages through the model."""
    raw = sys.stdin.read() if str(file) == "-" else Path(file).read_text()
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CliError(f"{file}: not JSON ({exc})") from exc

    async def go():
        async with _service() as svc:
            total = 0

            def progress(n: int) -> None:
                nonlocal total
                total += n

            info = await svc.import_(data, name=name, progress=progress)
            click.echo(f"imported session {info.name!r} (#{info.id}): {info.message_count} messages, {total} tokens")

    _run(go())

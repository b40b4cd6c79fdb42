"""Chat sessions that remember every turn: the session service.

A session's *stream* is its messages in the model's chat template (see :mod:`memllm.conversation`).
Its attention state keeps the sinks and the local window live; every block that leaves the window
goes to the session's :class:`memllm_storage.source.PersistentSource` and is committed **in the same
transaction** as the turn's message rows. A reply attends over the recent turns (window) plus the
kNN-retrieved blocks of any earlier turn, and over the session's knowledge bases if it has any.

Live states are a cache (``max_live`` sessions, least recently used first out). An idle state that
leaves it, and every idle state when the service closes, is spilled to disk
(:mod:`memllm.chat.spill`, memory mode): the session's next turn restores it bit for bit. A session
with no matching spill (after a crash, or a turn committed elsewhere since) is rebuilt from the
database: the first ``sinks`` tokens and the tail from the end of the last committed block are
re-read with a sink that discards (those tokens' blocks, if any left the window, are already
persisted), then the state's positions are moved on as if the middle had been evicted. Each
message row keeps the token ids it added to the stream (``meta["ids"]``), so the rebuilt window
holds exactly the tokens the lost one held.

A crash loses at most the turn in flight: a turn's rows and blocks commit together or not at all.
A turn whose consumer stops reading before it ends is not recorded (its live state is dropped).

Model work. With a :class:`~memllm.serving.scheduler.Scheduler` (a server), replies are jobs on
its model thread, decoded in one batch with every other running stream (other sessions, other
services), and the other forward passes (reading history, rebuilding a window) are its exclusive
tasks: the event loop never runs the model. Without one (command line, tests), the forward passes
run synchronously on the caller's thread, one turn at a time.
"""

from __future__ import annotations

import asyncio
import bisect
import dataclasses
import datetime as dt
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from memllm.attention import MemoryTrace, StreamingAttention, block_layout
from memllm.chat.spill import Snapshot, SpillStamp, StateSpill
from memllm.chat.state import DiscardSink, first_local_position, fork_state, shift_positions
from memllm.conversation import ChatCursor, ChatTemplate, reply_job
from memllm.engine import Engine
from memllm.memory.source import InMemorySource, MemorySource, MemoryView
from memllm.sampling import SamplingParams
from memllm.serving.jobs import GenerateJob, Text, run_job
from memllm.settings import chat_memory_changes, get_settings
from memllm.textstream import TextStream
from memllm_storage.models import Chunk, Document, Message
from memllm_storage.owners import Owner
from memllm_storage.repositories import MessageRepository, NotFoundError, SessionRepository, parse_id
from memllm_storage.source import PENDING_BASE, PersistentSource
from memllm_storage.store import LayoutMismatchError, MemoryStore

if TYPE_CHECKING:
    from memllm.serving.scheduler import Scheduler

log = logging.getLogger(__name__)
T = TypeVar("T")

EXPORT_FORMAT = "memllm.session/1"
SESSION_MODES = ("memory", "window")


class ChatError(ValueError):
    """A request the chat service refuses (bad name, bad import file, ...)."""


class SessionNotFoundError(ChatError, LookupError):
    pass


class SessionConflictError(ChatError):
    """A turn's commit found the session moved on (another process committed to it meanwhile).

    Nothing of the turn is recorded and its live state is dropped; retrying the turn is safe (it
    reads the session as committed)."""


@dataclass
class SessionInfo:
    id: int
    name: str
    created_at: dt.datetime | None
    updated_at: dt.datetime | None
    token_count: int
    message_count: int
    meta: dict[str, Any]

    @property
    def kb_ids(self) -> list[int]:
        return [int(k) for k in self.meta.get("kb_ids", [])]

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("created_at", "updated_at"):
            d[k] = d[k].isoformat() if d[k] else None
        return d


@dataclass
class MessageInfo:
    id: int
    ordinal: int
    role: str
    content: str
    token_start: int
    token_end: int
    created_at: dt.datetime | None

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["created_at"] = self.created_at.isoformat() if self.created_at else None
        return d


@dataclass
class TraceEntry:
    """One memory block a reply attended to: where it came from and how much attention it drew."""

    source: str  # "session" | "turn" (evicted during this turn, not yet committed) | "kb-<id>"
    block_id: int
    mass: float
    retrieved: int  # how many (layer, search) retrievals returned it
    token_start: int | None = None
    token_end: int | None = None
    message_id: int | None = None
    document_id: int | None = None
    chunk_id: int | None = None


@dataclass
class Citation:
    kb_id: int
    document_id: int | None
    chunk_id: int | None
    source_name: str | None
    text: str | None
    mass: float


@dataclass
class TurnResult:
    session_id: int
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None
    ttft_s: float | None
    total_s: float
    committed: bool
    user_message_id: int | None = None
    assistant_message_id: int | None = None
    trace: list[TraceEntry] = field(default_factory=list)
    citations: list[Citation] = field(default_factory=list)


@dataclass
class _Live:
    """A session's live attention state and where its stream stands."""

    session_id: int
    state: StreamingAttention
    source: PersistentSource | None
    kb_sources: list[tuple[int, PersistentSource]]
    cursor: ChatCursor
    spans: list[tuple[int, int, int]]  # (token_start, token_end, message id) of messages in the window
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    waiting_kbs: list[int] = field(default_factory=list)  # knowledge bases with no memory yet
    dropped: bool = False  # forgotten (drop_live): a turn that waited on its lock must reload

    def message_at(self, position: int) -> int | None:
        i = bisect.bisect_right([s for s, _, _ in self.spans], position) - 1
        if i >= 0 and self.spans[i][0] <= position < self.spans[i][1]:
            return self.spans[i][2]
        return None


@dataclass
class _Window:
    """The committed stream's sinks [0, n_sinks) and window [local_start, n): message rows that
    cover them, their token ids, and the stream's first and last messages."""

    n_sinks: int
    local_start: int
    rows: list[Message]
    first: Message | None
    last: Message | None
    head: list[int]
    tail: list[int]


class ChatService:
    """Sessions over one engine and one memory store (see module docstring)."""

    def __init__(
        self,
        engine: Engine | None,
        store: MemoryStore,
        *,
        mode: str | None = None,
        max_live: int | None = None,
        spill: int | None = None,
        scheduler: Scheduler | None = None,
        memory_changes: dict[str, object] | None = None,
    ) -> None:
        """``engine=None`` gives a service for the operations that need no model (list, history,
        export, delete). ``scheduler``: run the model work through it (see the module docstring).
        ``max_live``: live states kept in memory; ``spill``: live states kept on disk, 0 for none;
        ``memory_changes``: the engine's memory settings that the sessions change (defaults:
        ``MEMLLM_CHAT_MAX_LIVE``, ``MEMLLM_CHAT_SPILL``, ``MEMLLM_CHAT_MEMORY``)."""
        settings = get_settings()
        max_live = settings.chat_max_live if max_live is None else max_live
        spill = settings.chat_spill if spill is None else spill
        if max_live < 1 or spill < 0:
            raise ChatError(f"max_live must be at least 1 and spill at least 0 (got {max_live}, {spill})")
        self.engine = engine
        self.store = store
        self.scheduler = scheduler
        self.mode = mode or (engine.memory_settings.mode if engine is not None else "memory")
        if self.mode not in SESSION_MODES:
            raise ChatError(f"chat sessions need attention mode {' or '.join(SESSION_MODES)}, not {self.mode!r}")
        if engine is not None:
            self._memory_changes = chat_memory_changes(settings) if memory_changes is None else memory_changes
            self.memory = dataclasses.replace(engine.memory_settings, mode=self.mode, **self._memory_changes)
            self.layout = block_layout(engine.model.config, self.memory)
            self.template = ChatTemplate(engine.tokenizer)
        self.max_live = max_live
        spills = spill > 0 and engine is not None and self.mode == "memory"  # window mode re-reads its window
        self.spill = StateSpill(store.data_dir, spill) if spills else None
        self._live: OrderedDict[int, _Live] = OrderedDict()
        self._opening: dict[int, asyncio.Lock] = {}
        self._spilling: dict[int, asyncio.Event] = {}  # sessions whose state is being written out
        self._spill_tasks: set[asyncio.Task] = set()

    # ------------------------------------------------------------------------------ sessions
    async def create(
        self,
        name: str,
        *,
        system: str | None = None,
        kb_ids: Sequence[int] = (),
        tenant_id: int | None = None,
        meta: dict[str, Any] | None = None,
    ) -> SessionInfo:
        """A new session (names are unique per tenant); a system prompt becomes its first message."""
        if not name or not name.strip():
            raise ChatError("a session needs a non-empty name")
        meta = dict(meta or {})
        if kb_ids:
            meta["kb_ids"] = [int(k) for k in kb_ids]
        async with self.store.sessions() as db:
            repo = SessionRepository(db)
            if await repo.get_by_name(name, tenant_id) is not None:
                raise ChatError(f"a session named {name!r} already exists")
            row = await repo.create(name, tenant_id=tenant_id, meta=meta)
            row.model = self.engine.loaded.name if self.engine is not None else None
            await db.commit()
            sid = row.id
        if system:
            await self.append_messages(sid, [{"role": "system", "content": system}])
        return await self.get(sid)

    async def get(self, session_id: int) -> SessionInfo:
        async with self.store.sessions() as db:
            try:
                row = await SessionRepository(db).get(session_id)
            except NotFoundError:
                raise SessionNotFoundError(f"session {session_id} not found") from None
            count = await MessageRepository(db).count(session_id)
            return _info(row, count)

    async def find(self, name: str, tenant_id: int | None = None) -> SessionInfo | None:
        async with self.store.sessions() as db:
            row = await SessionRepository(db).get_by_name(name, tenant_id)
            if row is None:
                return None
            return _info(row, await MessageRepository(db).count(row.id))

    async def resolve(self, ref: int | str, tenant_id: int | None = None) -> SessionInfo:
        """A session by name, or by id (``"#12"`` or an int)."""
        if isinstance(ref, int):
            return await self.get(ref)
        if ref.startswith("#") and (session_id := parse_id(ref[1:])) is not None:
            return await self.get(session_id)
        found = await self.find(ref, tenant_id)
        if found is None:
            raise SessionNotFoundError(f"no session named {ref!r}")
        return found

    async def list(self, tenant_id: int | None = None) -> list[SessionInfo]:
        async with self.store.sessions() as db:
            msgs = MessageRepository(db)
            return [_info(r, await msgs.count(r.id)) for r in await SessionRepository(db).list(tenant_id)]

    async def history(self, session_id: int, *, limit: int = 50, before: int | None = None) -> list[MessageInfo]:
        """A page of messages, oldest first: the ``limit`` latest with ordinal < ``before``."""
        await self.get(session_id)
        async with self.store.sessions() as db:
            rows = await MessageRepository(db).history(session_id, limit=limit, before=before)
            return [_message(r) for r in rows]

    async def delete(self, session_id: int) -> bool:
        """Forget a session: rows, blocks, vectors and files. False if it did not exist."""
        live = self._live.pop(session_id, None)
        if live is not None:
            async with live.lock:
                pass
        writing = self._spilling.get(session_id)
        if writing is not None:  # the file it is writing goes with the session's folder
            await writing.wait()
        return await self.store.delete_owner(Owner.session(session_id))

    async def close(self) -> None:
        """Spill every idle live state (the next service restores them) and empty the cache."""
        lives = list(self._live.values())
        self._live.clear()
        for live in lives:
            if not live.lock.locked():
                self._start_spill(live)
        await self.wait_spills()

    async def wait_spills(self) -> None:
        """Wait until the live states on their way to disk are written."""
        await asyncio.gather(*list(self._spill_tasks), return_exceptions=True)

    def drop_live(self, session_id: int | None = None) -> None:
        """Forget live states (all, or one session's) without spilling them: they are restored from
        an earlier spill that still matches the database, or rebuilt from it, on use."""
        if session_id is None:
            for live in self._live.values():
                _forget(live)
            self._live.clear()
        else:
            live = self._live.pop(session_id, None)
            if live is not None:
                _forget(live)

    def _drop(self, live: _Live) -> None:
        """Forget this live state (not spilled); the cache's entry too if it is still this one."""
        if self._live.get(live.session_id) is live:
            del self._live[live.session_id]
        _forget(live)

    # ------------------------------------------------------------------------- export/import
    async def export(self, session_id: int) -> dict[str, Any]:
        """The session as JSON-able data: name, metadata and every message (memory is rebuilt on import)."""
        info = await self.get(session_id)
        async with self.store.sessions() as db:
            q = select(Message).where(Message.session_id == session_id).order_by(Message.ordinal)
            rows = (await db.execute(q)).scalars().all()
            model = (await SessionRepository(db).get(session_id)).model
        return {
            "format": EXPORT_FORMAT,
            "name": info.name,
            "meta": info.meta,
            "created_at": info.created_at.isoformat() if info.created_at else None,
            "model": model,
            "messages": [
                {"role": r.role, "content": r.content, "created_at": r.created_at.isoformat() if r.created_at else None}
                for r in rows
            ],
        }

    async def import_(
        self, data: dict[str, Any], *, name: str | None = None, tenant_id: int | None = None, progress=None
    ) -> SessionInfo:
        """Create a session from :meth:`export` data, reading every message through the model."""
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise ChatError(f"not a session export (expected format {EXPORT_FORMAT!r})")
        messages = data.get("messages")
        if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ChatError("an export's messages must be a list of {role, content} objects")
        meta = data.get("meta") if isinstance(data.get("meta"), dict) else {}
        info = await self.create(name or data.get("name") or "imported", tenant_id=tenant_id, meta=meta)
        try:
            await self.append_messages(info.id, messages, progress=progress)
        except BaseException:
            await self.delete(info.id)
            raise
        return await self.get(info.id)

    # ------------------------------------------------------------------------------- reading
    async def append_messages(self, session_id: int, messages: Sequence[dict[str, Any]], progress=None) -> list[int]:
        """Read messages into the session without answering (history, import); one commit per
        message. Returns their ids. ``progress(n_tokens)`` is called after each message."""
        ids_out = []
        async with self._hold(session_id) as live:
            try:
                for m in messages:
                    msg = {"role": m["role"], "content": m["content"]}
                    ids = self.engine.encode(live.cursor.owed + self.template.delta(live.cursor.context(), msg))
                    await self._refresh(live)
                    first_local = first_local_position(live.state)
                    await self._model(self.engine.prefill, live.state, ids)
                    rows = await self._commit(live, [(msg, ids, "", m.get("created_at"))], first_local)
                    ids_out.extend(rows)
                    if progress is not None:
                        progress(len(ids))
            except BaseException:
                self._drop(live)
                raise
        return ids_out

    def turn(
        self,
        session_id: int,
        text: str,
        params: SamplingParams,
        *,
        ephemeral: bool = False,
        trace: bool = False,
    ) -> Turn:
        """A user turn and the model's reply: ``async for piece in turn.stream()``, then ``turn.result``.

        ``ephemeral``: answer from a copy of the live state and record nothing (evaluation, "ask
        without remembering"). ``trace``: report the memory blocks the reply attended to.
        """
        return Turn(self, session_id, text, params, ephemeral=ephemeral, trace=trace)

    async def reply(self, session_id: int, text: str, params: SamplingParams, **kwargs: Any) -> TurnResult:
        turn = self.turn(session_id, text, params, **kwargs)
        async for _ in turn.stream():
            pass
        assert turn.result is not None
        return turn.result

    # ------------------------------------------------------------------------------ internals
    async def _model(self, fn: Callable[..., T], *args: Any) -> T:
        """Model work: an exclusive task of the scheduler, or a plain call without one."""
        if self.scheduler is not None:
            return await self.scheduler.run(fn, *args)
        return fn(*args)

    async def _get_live(self, session_id: int) -> _Live:
        live = self._live.get(session_id)
        if live is not None:
            self._live.move_to_end(session_id)
            return live
        lock = self._opening.setdefault(session_id, asyncio.Lock())
        async with lock:
            live = self._live.get(session_id)
            if live is None:
                writing = self._spilling.get(session_id)
                if writing is not None:  # its state is on the way to disk: restore that
                    await writing.wait()
                live = await self._rebuild(session_id)
                self._live[session_id] = live
        self._opening.pop(session_id, None)
        self._trim_cache()
        return live

    @asynccontextmanager
    async def _hold(self, session_id: int) -> AsyncIterator[_Live]:
        """The session's current live state, its lock held: one that a failed turn dropped while
        this one waited, or that is behind the committed rows (another process's turn), is
        replaced by a fresh one (restored from the spill or rebuilt)."""
        while True:
            live = await self._get_live(session_id)
            await live.lock.acquire()
            try:
                if not live.dropped and await self._in_step(live):
                    break
            except BaseException:
                live.lock.release()
                raise
            live.lock.release()
            if not live.dropped:
                log.info("session %d: committed elsewhere since its live state was read; reloading", session_id)
                self._drop(live)
        try:
            yield live
        finally:
            live.lock.release()

    async def _in_step(self, live: _Live) -> bool:
        """Whether the committed stream ends where the live state's cursor does."""
        async with self.store.sessions() as db:
            return await _stream_end(db, live.session_id) == (live.cursor.count, live.cursor.n_tokens)

    def _trim_cache(self) -> None:
        """Drop the least recently used idle live states beyond ``max_live``, spilling them in the
        background (the turn that made room does not wait for the write)."""
        for sid in list(self._live):
            if len(self._live) <= self.max_live:
                return
            live = self._live[sid]
            if not live.lock.locked():
                del self._live[sid]
                self._start_spill(live)

    def _start_spill(self, live: _Live) -> None:
        """Write a live state that has left the cache to the spill, as a task."""
        if live.source is not None:
            live.source.discard_pending()
        if self.spill is None:
            return
        done = self._spilling[live.session_id] = asyncio.Event()  # opening the session waits for it
        task = asyncio.get_running_loop().create_task(self._spill_out(live, done))
        self._spill_tasks.add(task)
        task.add_done_callback(self._spill_tasks.discard)

    async def _spill_out(self, live: _Live, done: asyncio.Event) -> None:
        """See :meth:`_start_spill`. A failure only costs the next turn a re-read of the window."""
        assert self.spill is not None
        spill, sid = self.spill, live.session_id
        try:
            async with live.lock:  # a turn that got this state before it left the cache waits
                state = live.state
                if live.dropped or state.n_tokens != live.cursor.n_tokens:
                    log.warning("session %d: live state out of step with its stream; not spilled", sid)
                    return
                window = await self._committed_window(sid, live.source, state.n_tokens)
                stamp = self._stamp(window, state.n_tokens, live.cursor.count)
                path = await asyncio.to_thread(lambda: spill.save(sid, Snapshot.of(state), stamp))
            log.info("session %d: live state spilled to %s", sid, path)
        except Exception as exc:
            log.warning("session %d: could not spill the live state (%s); its window will be re-read", sid, exc)
            await asyncio.to_thread(spill.discard, sid)
        finally:
            done.set()
            if self._spilling.get(sid) is done:
                del self._spilling[sid]

    async def _refresh(self, live: _Live) -> None:
        """Catch the live state's sources up with commits, and attach the knowledge bases whose
        first blocks were committed since it was read."""
        if live.source is not None:
            await live.source.refresh()
        for _, src in live.kb_sources:
            await src.refresh()
        if live.waiting_kbs:
            ready, live.waiting_kbs = await self._open_kbs(live.waiting_kbs)
            for kb in ready:
                _attach(live.state, kb[1])
            live.kb_sources += ready

    async def _open_kbs(self, kb_ids: Sequence[int]) -> tuple[list[tuple[int, PersistentSource]], list[int]]:
        """The knowledge bases' sources, and the ids of those with no memory yet (a first upload
        still ingesting): a turn answers from what exists and reads them once they have blocks."""
        ready, waiting = [], []
        for k in kb_ids:
            try:
                ready.append((k, await self.store.open_source(Owner.kb(k))))
            except LayoutMismatchError:  # no layout stored: nothing ingested yet
                waiting.append(k)
        return ready, waiting

    async def _committed_window(self, session_id: int, source: PersistentSource | None, n: int) -> _Window:
        """The sinks and window that a state holding the ``n``-token committed stream holds."""
        n_sinks = min(self.memory.sinks, n)
        if source is not None and source.num_blocks():
            local_start = int(source.spans(source.block_ids())[:, 1].max())
        elif self.mode == "window":
            local_start = max(n_sinks, n - self.memory.window)
        else:
            local_start = n_sinks
        local_start = max(local_start, n_sinks)
        async with self.store.sessions() as db:
            q = (
                select(Message)
                .where(Message.session_id == session_id)
                .where(or_(Message.token_start < n_sinks, Message.token_end > local_start))
                .order_by(Message.ordinal)
            )
            rows = list((await db.execute(q)).scalars())
            ends = select(Message).where(Message.session_id == session_id)
            first = (await db.execute(ends.order_by(Message.ordinal).limit(1))).scalar_one_or_none()
            last = (await db.execute(ends.order_by(Message.ordinal.desc()).limit(1))).scalar_one_or_none()
        head, tail = _stream_slice(rows, 0, n_sinks), _stream_slice(rows, local_start, n)
        return _Window(n_sinks, local_start, rows, first, last, head, tail)

    def _stamp(self, window: _Window, n: int, messages: int) -> SpillStamp:
        return SpillStamp(
            n_tokens=n,
            messages=messages,
            local_start=window.local_start,
            window_crc=SpillStamp.window_checksum(window.head, window.tail),
            model=self.engine.loaded.name,
            dtype=str(self.engine.model.dtype),
            memory=repr(self.memory),
        )

    async def _rebuild(self, session_id: int) -> _Live:
        """The live state of a session from its committed rows: its spilled state if that matches
        them, else its sinks and window re-read (see module docstring)."""
        info = await self.get(session_id)
        kb_sources, waiting_kbs = await self._open_kbs(info.kb_ids)
        source = None
        if self.mode == "memory":
            source = await self.store.open_source(Owner.session(session_id), self.layout)
            source.discard_pending()
            await source.refresh()
        state = self.engine.new_state(
            self.mode, extra_sources=[s for _, s in kb_sources], sink=source, **self._memory_changes
        )
        n = info.token_count
        window = await self._committed_window(session_id, source, n)
        rows, first, last, head, tail = window.rows, window.first, window.last, window.head, window.tail
        n_sinks, local_start = window.n_sinks, window.local_start
        cursor = ChatCursor(
            first=_role_content(first),
            last=_role_content(last),
            count=info.message_count,
            owed=(last.meta or {}).get("owed", "") if last is not None else "",
            n_tokens=n,
        )
        spilled = None
        if self.spill is not None:
            stamp = self._stamp(window, n, info.message_count)
            spilled = await asyncio.to_thread(self.spill.load, session_id, stamp)
        if spilled is not None:
            spilled.restore(state)
        elif head or tail:
            await self._model(self._reread, state, source, head, tail, local_start - n_sinks, session_id)
        if state.n_tokens != n:
            raise RuntimeError(f"session {session_id}: rebuilt {state.n_tokens} tokens of a {n}-token stream")
        spans = [(r.token_start, r.token_end, r.id) for r in rows if r.token_end > local_start]
        how = "restored the spilled" if spilled is not None else "rebuilt the live"
        log.info("session %d: %s window (%d + %d tokens of %d)", session_id, how, len(head), len(tail), n)
        return _Live(session_id, state, source, kb_sources, cursor, spans, waiting_kbs=waiting_kbs)

    def _reread(
        self,
        state: StreamingAttention,
        source: PersistentSource | None,
        head: list[int],
        tail: list[int],
        skipped: int,
        session_id: int,
    ) -> None:
        """Read a session's sinks (``head``) and window (``tail``) into a fresh state, with a sink
        that discards (those tokens' blocks are persisted), then skip the ``skipped`` positions
        between them (model work)."""
        discard = DiscardSink(self.layout)
        state.sink = discard if source is not None else None
        # the last forward of the lost state read at most `chunk` tokens after evicting down to
        # `window`: read the tail the same way so nothing leaves the rebuilt window
        ids = head + tail
        split = max(len(head), len(ids) - self.memory.chunk)
        for part in (ids[:split], ids[split:]):
            if part:
                self.engine.prefill(state, part)
        state.sink = source
        if discard.discarded:
            log.warning("session %d: %d blocks left the window while rebuilding it", session_id, discard.discarded)
        shift_positions(state, skipped)

    async def _commit(
        self,
        live: _Live,
        entries: Sequence[tuple[dict[str, str], list[int], str, str | None]],
        first_local: int,
    ) -> list[int]:
        """Write the messages (message, stream ids, owed text, created_at) and the blocks that left
        the window since ``first_local`` in one transaction; then advance the live cursor.

        The blocks that the next read would push out of the window leave now (the reply is already
        out): they are committed with this turn, and the next turn's first token does not wait for
        the buffer's shift, nor for the key mass the turn's prompt owes (``StreamingAttention.settle``)."""
        if live.state.overflow or live.state.buf.owes_mass:  # model work (an exclusive scheduler task)
            await self._model(live.state.settle)
        source = live.source
        pending = source.pending if source is not None else []
        blocks, pos = [], first_local
        for b in pending:  # spans in stream positions (whatever the attention state recorded)
            blocks.append(dataclasses.replace(b, token_start=pos, token_end=pos + b.length))
            pos += b.length
        new_spans, row_ids = [], []
        owner = Owner.session(live.session_id)
        async with self.store.writer(owner, self.layout, model=self.engine.loaded.name) as w:
            await _check_end(w.session, live)
            pos = live.cursor.n_tokens
            for msg, ids, owed, created_at in entries:
                row = await w.messages.append(
                    live.session_id, msg["role"], msg["content"], pos, pos + len(ids), meta={"ids": ids, "owed": owed}
                )
                if created_at:
                    row.created_at = _parse_time(created_at)
                new_spans.append((pos, pos + len(ids), row.id))
                row_ids.append(row.id)
                pos += len(ids)
            if blocks:
                spans = live.spans + new_spans
                starts = [s for s, _, _ in spans]
                msg_ids = []
                for b in blocks:
                    i = bisect.bisect_right(starts, b.token_start) - 1
                    msg_ids.append(spans[i][2] if i >= 0 and spans[i][0] <= b.token_start < spans[i][1] else None)
                await w.add_blocks(blocks, message_ids=msg_ids)
        if source is not None:
            source.discard_pending()  # now committed (the writer added them to the source's indexes)
        for msg, ids, owed, _ in entries:
            live.cursor.advance(msg, len(ids), owed)
        keep_from = first_local_position(live.state)
        live.spans = [s for s in live.spans + new_spans if s[1] > keep_from]
        return row_ids


class Turn:
    """One user turn (see :meth:`ChatService.turn`)."""

    def __init__(
        self, service: ChatService, session_id: int, text: str, params: SamplingParams, *, ephemeral: bool, trace: bool
    ) -> None:
        self.service = service
        self.session_id = session_id
        self.text = text
        self.params = params
        self.ephemeral = ephemeral
        self.want_trace = trace
        self.result: TurnResult | None = None
        self._job: GenerateJob | None = None
        self._cut = False

    def cut(self) -> bool:
        """End the reply early but record it (a time limit): the reply finishes as if it had
        reached ``max_tokens`` (finish reason ``"length"``, the end-of-turn marker read) at its next
        token, and the turn commits what was generated; keep reading :meth:`stream` to its end.
        False if the reply has not started (the turn still waits on its session): a reply that
        starts later is empty."""
        self._cut = True
        if self._job is None:
            return False
        _cut_job(self._job)
        return True

    async def stream(self) -> AsyncIterator[str]:
        svc, engine = self.service, self.service.engine
        t0 = time.perf_counter()
        ttft: list[float] = []
        async with svc._hold(self.session_id) as live:
            done = False
            try:
                await svc._refresh(live)
                user = {"role": "user", "content": self.text}
                ids = engine.encode(live.cursor.owed + svc.template.delta(live.cursor.context(), user, True))
                first_local = first_local_position(live.state)
                if self.ephemeral:
                    sources: list[MemorySource] = [live.source] if live.source is not None else []
                    sources += [s for _, s in live.kb_sources]
                    overlay = InMemorySource(svc.layout, name="turn") if svc.mode == "memory" else None
                    state = fork_state(engine, live.state, sink=overlay, extra_sources=sources, trace=self.want_trace)
                else:
                    state = live.state
                    state.trace = MemoryTrace() if self.want_trace else None
                stream = TextStream(engine.tokenizer, self.params.stop)
                read_ids: list[int] = []

                def on_token(_token: int) -> None:
                    if not ttft:
                        ttft.append(time.perf_counter() - t0)

                job = self._job = reply_job(engine, ids, self.params, stream, read_ids, on_token)
                if self._cut:
                    _cut_job(job)
                if svc.scheduler is None:
                    for event in run_job(engine, state, job, ids):
                        if isinstance(event, Text):
                            yield event.text
                else:
                    async with svc.scheduler.submit(job, state, ids) as handle:  # leaving cancels the job
                        async for event in handle:
                            if isinstance(event, Text):
                                yield event.text
                reply = {"role": "assistant", "content": stream.text}
                context = ChatTemplate.context(live.cursor.first or user, user, live.cursor.count + 1)
                owed = svc.template.owed_after_reply(context, reply)
                trace_entries, citations = (await self._trace(state, live)) if state.trace is not None else ([], [])
                state.trace = None if state is live.state else state.trace
                row_ids: list[int | None] = [None, None]
                if not self.ephemeral:
                    row_ids = await svc._commit(
                        live, [(user, ids, "", None), (reply, read_ids, owed, None)], first_local
                    )
                done = True
            finally:
                self._job = None
                if not done and not self.ephemeral:
                    svc._drop(live)  # the state read a turn that was not recorded
        generated = len(read_ids) - (1 if state.finish_reason else 0)
        self.result = TurnResult(
            session_id=self.session_id,
            text=stream.text,
            prompt_tokens=len(ids),
            completion_tokens=max(generated, 0),
            finish_reason=state.finish_reason,
            ttft_s=ttft[0] if ttft else None,
            total_s=time.perf_counter() - t0,
            committed=not self.ephemeral,
            user_message_id=row_ids[0],
            assistant_message_id=row_ids[1],
            trace=trace_entries,
            citations=citations,
        )

    async def _trace(self, state: StreamingAttention, live: _Live) -> tuple[list[TraceEntry], list[Citation]]:
        """Map the state's memory trace (view block ids) to sessions, messages and KB chunks."""
        trace = state.trace
        assert trace is not None
        memory = state.memory
        sources = memory.sources if isinstance(memory, MemoryView) else [memory]
        entries: list[TraceEntry] = []
        kb_of = {id(src): kb for kb, src in live.kb_sources}
        for view_id, mass in trace.top(len(trace.mass)):
            if isinstance(memory, MemoryView):
                src_index, bid = int(view_id) >> 48, int(view_id) & ((1 << 48) - 1)
            else:
                src_index, bid = 0, int(view_id)
            src = sources[src_index]
            entry = TraceEntry(source="turn", block_id=bid, mass=float(mass), retrieved=trace.retrieved.get(view_id, 0))
            if isinstance(src, PersistentSource) and bid < PENDING_BASE:
                info = src.block_info(np.array([bid]))[0]
                entry.source = "session" if src is live.source else f"kb-{kb_of.get(id(src), '?')}"
                if info is not None:
                    entry.token_start, entry.token_end = info.token_start, info.token_end
                    entry.message_id, entry.document_id, entry.chunk_id = (
                        info.message_id,
                        info.document_id,
                        info.chunk_id,
                    )
            entries.append(entry)
        citations: list[Citation] = []
        kb_entries = [e for e in entries if e.source.startswith("kb-") and e.chunk_id is not None]
        if kb_entries:
            async with self.service.store.sessions() as db:
                chunk_ids = list({e.chunk_id for e in kb_entries})
                chunks = {c.id: c for c in (await db.execute(select(Chunk).where(Chunk.id.in_(chunk_ids)))).scalars()}
                doc_ids = list({c.document_id for c in chunks.values()})
                docs = {d.id: d for d in (await db.execute(select(Document).where(Document.id.in_(doc_ids)))).scalars()}
            seen: dict[int, Citation] = {}
            for e in kb_entries:
                c = chunks.get(e.chunk_id)
                if e.chunk_id in seen:
                    seen[e.chunk_id].mass += e.mass
                    continue
                doc = docs.get(c.document_id) if c is not None else None
                seen[e.chunk_id] = Citation(
                    kb_id=int(e.source[3:]),
                    document_id=e.document_id,
                    chunk_id=e.chunk_id,
                    source_name=doc.source_name if doc is not None else None,
                    text=c.text if c is not None else None,
                    mass=e.mass,
                )
            citations = sorted(seen.values(), key=lambda c: -c.mass)
        return entries, citations


def _cut_job(job: GenerateJob) -> None:
    """Make a running reply job finish at its next token as if ``max_tokens`` were reached (safe
    from the event loop while the model thread runs it: one attribute assignment)."""
    job.params = dataclasses.replace(job.params, max_tokens=len(job.generated))


def _forget(live: _Live) -> None:
    """Mark a live state dropped (a turn waiting on its lock reloads) and discard its pending blocks."""
    live.dropped = True
    if live.source is not None:
        live.source.discard_pending()


def _attach(state: StreamingAttention, source: MemorySource) -> None:
    """Let ``state`` retrieve from one more source (read-only; evictions still go to its sink)."""
    memory = state.memory
    if memory is None:  # window mode: no retrieval
        return
    if isinstance(memory, MemoryView):
        memory.sources.append(source)
    else:
        state.memory = MemoryView([memory, source])


async def _stream_end(db: AsyncSession, session_id: int) -> tuple[int, int]:
    """(message count, token end) of the session's committed stream, from its last message row."""
    q = select(Message.ordinal, Message.token_end).where(Message.session_id == session_id)
    last = (await db.execute(q.order_by(Message.ordinal.desc()).limit(1))).first()
    return (0, 0) if last is None else (int(last[0]) + 1, int(last[1]))


async def _check_end(db: AsyncSession, live: _Live) -> None:
    """Refuse a commit at a position the committed stream has left (inside the writer's
    transaction, which holds the session's lock across processes)."""
    found = await _stream_end(db, live.session_id)
    expected = (live.cursor.count, live.cursor.n_tokens)
    if found != expected:
        raise SessionConflictError(
            f"session {live.session_id} changed while this turn ran (committed: {found[0]} messages, "
            f"{found[1]} tokens; this turn read {expected[0]}, {expected[1]}); nothing was recorded, retry the turn"
        )


def _info(row: Any, count: int) -> SessionInfo:
    return SessionInfo(
        row.id, row.name, row.created_at, row.updated_at, int(row.token_count or 0), count, dict(row.meta or {})
    )


def _message(r: Message) -> MessageInfo:
    return MessageInfo(r.id, r.ordinal, r.role, r.content, r.token_start, r.token_end, r.created_at)


def _role_content(row: Message | None) -> dict[str, str] | None:
    return None if row is None else {"role": row.role, "content": row.content}


def _stream_slice(rows: Sequence[Message], start: int, end: int) -> list[int]:
    """Token ids of stream positions [start, end) from message rows (ordered) that cover them."""
    out: list[int] = []
    for r in rows:
        a, b = max(start, r.token_start), min(end, r.token_end)
        if a >= b:
            continue
        ids = (r.meta or {}).get("ids")
        if ids is None or len(ids) != r.token_end - r.token_start:
            raise RuntimeError(f"message {r.id} has no stream ids for its span; cannot rebuild the session")
        out.extend(ids[a - r.token_start : b - r.token_start])
    if len(out) != max(0, end - start):
        raise RuntimeError(f"messages cover {len(out)} of the {end - start} tokens [{start}, {end}) of the stream")
    return out


def _parse_time(value: str | dt.datetime) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    try:
        return dt.datetime.fromisoformat(value)
    except ValueError:
        raise ChatError(f"bad created_at {value!r} (ISO 8601 expected)") from None

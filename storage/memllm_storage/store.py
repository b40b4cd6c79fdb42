"""MemoryStore: the process-wide entry point to persisted memory.

Owns the async engine's session factory, the data directory, the per-owner locks and one
:class:`PersistentSource` per opened owner (shared by every request of the process, so a write or
deletion through this store is visible to this process's searches at once).

Files of an owner live in ``<data_dir>/memory/<kind>-<id>/``: ``payload-NNNNNN.bin`` (block
records; the highest generation referenced by rows is the *active* file appended to),
``layer-LLL.index`` (one FAISS index per memory layer) and ``owner.lock`` (``flock``).

Concurrency: writers of one owner are serialized by an in-process lock, the owner's file lock and
(PostgreSQL) ``pg_advisory_xact_lock``; on SQLite the writer's first statement is an UPDATE of the
owner row, which takes the database write lock (waiting up to ``busy_timeout``). Readers use
committed rows only and never block writers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import delete, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from memllm.memory.types import BlockLayout
from memllm_storage.blockfile import PayloadWriter
from memllm_storage.crashpoints import crash_point
from memllm_storage.engine import is_postgres, make_engine, session_factory
from memllm_storage.index_files import fsync_dir, remove_temp_files
from memllm_storage.locks import OwnerLocks
from memllm_storage.migrate import check_at_head, create_if_new
from memllm_storage.models import MemoryBlockRow, utcnow
from memllm_storage.owners import Owner
from memllm_storage.repositories import BlockRepository, IndexStateRepository, NotFoundError
from memllm_storage.source import BlockEntry, PersistentSource
from memllm_storage.writer import OwnerWriter

log = logging.getLogger(__name__)

PAYLOAD_RE = re.compile(r"^payload-(\d{6})\.bin$")


class LayoutMismatchError(ValueError):
    """Blocks of a different geometry (or model) than the owner's existing memory."""


def layout_to_json(layout: BlockLayout) -> dict[str, Any]:
    d = asdict(layout)
    d["layers"] = list(layout.layers)
    return d


def layout_from_json(data: dict[str, Any]) -> BlockLayout:
    return BlockLayout(
        layers=tuple(int(x) for x in data["layers"]),
        n_kv_heads=int(data["n_kv_heads"]),
        head_dim=int(data["head_dim"]),
        block_size=int(data["block_size"]),
        representatives=int(data["representatives"]),
    )


@dataclass
class CompactionReport:
    owner: str
    live_blocks: int
    bytes_before: int
    bytes_after: int


class MemoryStore:
    """See module docstring. Create with :meth:`open` (checks migrations) or the constructor."""

    def __init__(
        self,
        engine: AsyncEngine,
        data_dir: Path | str,
        *,
        ivf_threshold: int = 200_000,
        checkpoint_fraction: float = 0.05,
        payload_dtype: str = "float16",
        verify_payloads: bool = True,
        owns_engine: bool = False,
    ) -> None:
        self.engine = engine
        self.data_dir = Path(data_dir)
        self.ivf_threshold = ivf_threshold
        self.checkpoint_fraction = checkpoint_fraction
        self.payload_dtype = payload_dtype
        self.verify_payloads = verify_payloads
        self._owns_engine = owns_engine
        self._session_factory = session_factory(engine)
        self._locks = OwnerLocks()
        self._sources: dict[Owner, PersistentSource] = {}

    @classmethod
    async def open(
        cls,
        url: str,
        data_dir: Path | str,
        *,
        check_migrations: bool = True,
        schema: str | None = None,
        **kwargs: Any,
    ) -> MemoryStore:
        """Create an engine for ``url`` (``schema``: PostgreSQL search path), create the schema of a
        new embedded SQLite file, refuse any other database not at head, return the store."""
        engine = make_engine(url, schema=schema)
        try:
            if check_migrations:
                await create_if_new(engine)
                await check_at_head(engine)
        except BaseException:
            await engine.dispose()
            raise
        return cls(engine, data_dir, owns_engine=True, **kwargs)

    @classmethod
    async def from_settings(cls, settings: Any, **kwargs: Any) -> MemoryStore:
        """From :class:`memllm.settings.Settings` (database url, data dir, memory settings)."""
        mem = settings.memory
        kwargs.setdefault("ivf_threshold", mem.ivf_threshold)
        kwargs.setdefault("payload_dtype", mem.payload_dtype)
        return await cls.open(settings.resolved_database_url, settings.data_dir, **kwargs)

    def sessions(self) -> AsyncSession:
        """A new database session (``async with store.sessions() as s``)."""
        return self._session_factory()

    async def close(self) -> None:
        """Save dirty indexes (best effort, under each owner's lock) and release resources."""
        for owner, src in list(self._sources.items()):
            if src.indexes.dirty:
                async with self._locks.hold(str(owner), self._lock_path(owner)):
                    src.indexes.checkpoint(force=True)
            src.close()
        self._sources.clear()
        if self._owns_engine:
            await self.engine.dispose()

    def _lock_path(self, owner: Owner) -> Path:
        return owner.directory(self.data_dir) / "owner.lock"

    # ---- opening sources -----------------------------------------------------------------------
    async def open_source(self, owner: Owner, layout: BlockLayout | None = None) -> PersistentSource:
        """The process's source for ``owner``, loaded and index-checked on first use.

        ``layout`` is needed only for an owner without memory yet; it must match the stored one.
        """
        src = self._sources.get(owner)
        if src is not None:
            return src
        async with self._locks.hold(str(owner), self._lock_path(owner)):
            src = self._sources.get(owner)
            if src is None:
                async with self.sessions() as session:
                    src = await self._load(owner, layout, session)
        return src

    async def _owner_layout(self, owner: Owner, session: AsyncSession) -> BlockLayout | None:
        row = await session.get(owner.row_model, owner.id)
        if row is None:
            raise NotFoundError(f"{owner} not found")
        return layout_from_json(row.memory_layout) if row.memory_layout else None

    async def _load(self, owner: Owner, layout: BlockLayout | None, session: AsyncSession) -> PersistentSource:
        """Build a source from committed rows and check/repair its indexes (caller holds the lock)."""
        stored = await self._owner_layout(owner, session)
        if stored is not None and layout is not None and stored != layout:
            raise LayoutMismatchError(f"{owner} stores blocks of layout {stored}, not {layout}")
        use = stored or layout
        if use is None:
            raise LayoutMismatchError(f"{owner} has no memory yet: pass the block layout")
        src = PersistentSource(
            self,
            owner,
            use,
            ivf_threshold=self.ivf_threshold,
            checkpoint_fraction=self.checkpoint_fraction,
            verify_payloads=self.verify_payloads,
        )
        repo = BlockRepository(session)
        fingerprint = await repo.fingerprint(owner)
        rows = await repo.list(owner)
        src._reset({r.id: BlockEntry.from_row(r) for r in rows})
        src.directory.mkdir(parents=True, exist_ok=True)
        remove_temp_files(src.directory)
        count, checksum = src.committed_summary()
        src.indexes.open(src.block_ids(), count, src._reps_of)
        states = await IndexStateRepository(session).list(owner)
        for layer, st in states.items():
            if (st.vector_count, st.id_checksum) != (count, checksum):
                log.warning(
                    "%s layer %d: index_state (%d, %d) disagrees with rows (%d, %d); rows win",
                    owner,
                    layer,
                    st.vector_count,
                    st.id_checksum,
                    count,
                    checksum,
                )
        src._fingerprint = fingerprint
        self._sources[owner] = src
        return src

    async def _sync_source(self, src: PersistentSource, session: AsyncSession) -> bool:
        """Make ``src`` equal the committed rows (incremental when only blocks were added)."""
        repo = BlockRepository(session)
        fp = await repo.fingerprint(src.owner)
        if fp == src._fingerprint:
            return False
        old = src._fingerprint
        current = src._blocks
        if old is not None and fp[3] == old[3] and fp[1] >= old[1]:
            new_rows = await repo.list(src.owner, after_id=old[1])
            if len(current) + len(new_rows) == fp[0]:
                src._apply([(r.id, BlockEntry.from_row(r)) for r in new_rows], [])
                src._fingerprint = fp
                return True
        rows = {r.id: BlockEntry.from_row(r) for r in await repo.list(src.owner)}
        added = [(i, e) for i, e in rows.items() if i not in current]
        removed = [i for i in current if i not in rows]
        moved = [
            (i, e)
            for i, e in rows.items()
            if i in current and (current[i].file, current[i].offset) != (e.file, e.offset)
        ]
        src._apply(added, removed, moved)
        src._fingerprint = fp
        return True

    # ---- writing -------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def writer(
        self, owner: Owner, layout: BlockLayout | None = None, *, model: str | None = None
    ) -> AsyncIterator[OwnerWriter]:
        """An all-or-nothing write to ``owner`` (see :mod:`memllm_storage.writer` for the order of steps).

        Everything done through the yielded writer (and its ``session``) commits together when the
        block exits normally, and is rolled back (payload bytes truncated) if it raises.
        """
        async with self._locks.hold(str(owner), self._lock_path(owner)), self.sessions() as session:
            await self._lock_owner(session, owner)
            stored = await self._owner_layout(owner, session)
            if stored is None:
                if layout is None:
                    raise LayoutMismatchError(f"{owner} has no memory yet: pass the block layout")
                row = await session.get(owner.row_model, owner.id)
                row.memory_layout = layout_to_json(layout)
                if model is not None:
                    row.model = model
            elif layout is not None and stored != layout:
                raise LayoutMismatchError(f"{owner} stores blocks of layout {stored}, not {layout}")
            src = self._sources.get(owner)
            if src is None or src.closed:
                src = await self._load(owner, layout, session)
            else:
                await self._sync_source(src, session)
            payload = self._prepare_payload(src)
            w = OwnerWriter(session, owner, src, payload, self.payload_dtype)
            try:
                yield w
                payload.sync()
                count, checksum = w.index_state_after()
                files = {layer: src.indexes.file_name(slot) for slot, layer in enumerate(src.layout.layers)}
                await IndexStateRepository(session).put(owner, files, count, checksum)
                crash_point("writer.before_commit")
            except BaseException:
                await session.rollback()
                payload.rollback()
                payload.close()
                raise
            try:
                await session.commit()
            except BaseException:
                src._fingerprint = None  # outcome unknown: next sync reloads from rows
                payload.close()
                raise
            payload.close()
            crash_point("writer.after_commit")
            src._apply(w.added, list(w.removed), w.moved)
            src._fingerprint = await BlockRepository(session).fingerprint(owner)
            await session.commit()
            try:
                src.indexes.checkpoint()
            except OSError:
                log.exception("%s: saving indexes failed (they will be repaired on next open)", owner)

    async def _lock_owner(self, session: AsyncSession, owner: Owner) -> None:
        """Serialize writers of ``owner`` in the database and check it still exists."""
        if is_postgres(str(self.engine.url)):
            await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": owner.lock_key})
        model = owner.row_model
        res = await session.execute(update(model).where(model.id == owner.id).values(updated_at=utcnow()))
        if res.rowcount == 0:
            raise NotFoundError(f"{owner} not found")

    def _prepare_payload(self, src: PersistentSource) -> PayloadWriter:
        """Pick the active payload file, delete unreferenced ones, truncate orphan bytes (locked)."""
        directory = src.directory
        directory.mkdir(parents=True, exist_ok=True)
        remove_temp_files(directory)
        referenced = {e.file for e in src._blocks.values()}
        existing = sorted(p.name for p in directory.iterdir() if PAYLOAD_RE.match(p.name))
        if referenced:
            active = max(referenced)
        elif existing:
            active = existing[-1]
        else:
            active = "payload-000001.bin"
        for name in existing:
            if name != active and name not in referenced:
                (directory / name).unlink(missing_ok=True)
                log.info("%s: removed unreferenced payload file %s", src.owner, name)
        end = max((e.offset + e.length for e in src._blocks.values() if e.file == active), default=0)
        writer = PayloadWriter(directory / active)
        if writer.size > end:
            log.warning("%s: truncating %d orphan payload bytes of %s", src.owner, writer.size - end, active)
            writer.truncate(end)
            writer.start_size = end
        elif writer.size < end:
            writer.close()
            raise RuntimeError(f"{src.owner}: payload file {active} is shorter ({writer.size}) than its rows ({end})")
        return writer

    # ---- deleting --------------------------------------------------------------------------------
    async def delete_owner(self, owner: Owner) -> bool:
        """Delete a knowledge base or session: rows (cascade), vectors, files. False if absent."""
        async with self._locks.hold(str(owner), self._lock_path(owner)), self.sessions() as session:
            if is_postgres(str(self.engine.url)):
                await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": owner.lock_key})
            model = owner.row_model
            res = await session.execute(delete(model).where(model.id == owner.id))
            await session.commit()
            src = self._sources.pop(owner, None)
            if src is not None:
                src.close()
            shutil.rmtree(owner.directory(self.data_dir), ignore_errors=True)
            return bool(res.rowcount)

    async def compact(self, owner: Owner) -> CompactionReport:
        """Rewrite the owner's live records into a new payload file and drop the old files.

        New file written + fsynced, then rows repointed in one transaction, then old files deleted;
        a crash between steps leaves either the old or the new file referenced (the other is
        removed by the next writer).
        """
        async with self.writer(owner) as w:
            src = w.source
            directory = src.directory
            entries = sorted(src._blocks.items(), key=lambda kv: (kv[1].file, kv[1].offset))
            files = {p.name: p.stat().st_size for p in directory.iterdir() if PAYLOAD_RE.match(p.name)}
            before = sum(files.values())
            live = sum(e.length for _, e in entries)
            if live == before and len(files) <= 1:
                return CompactionReport(str(owner), len(entries), before, before)
            gen = max((int(PAYLOAD_RE.match(n).group(1)) for n in files), default=0) + 1
            new_name = f"payload-{gen:06d}.bin"
            new_path = directory / new_name
            moved: list[tuple[int, BlockEntry]] = []
            with open(new_path, "wb") as f:
                offset = 0
                for bid, e in entries:
                    view = src._reader(e.file).record(e.offset, e.length, e.checksum)
                    f.write(view._buf)
                    moved.append(
                        (
                            bid,
                            BlockEntry(
                                new_name,
                                offset,
                                e.length,
                                e.checksum,
                                e.token_start,
                                e.token_end,
                                e.n_reps,
                                e.document_id,
                                e.chunk_id,
                                e.message_id,
                            ),
                        )
                    )
                    offset += e.length
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(directory)
            crash_point("compaction.after_copy")
            if moved:
                await w.session.execute(
                    update(MemoryBlockRow),
                    [{"id": bid, "payload_file": new_name, "payload_offset": e.offset} for bid, e in moved],
                )
            w.moved = moved
            old_files = [n for n in files if n != new_name]
        crash_point("compaction.after_commit")
        async with self._locks.hold(str(owner), self._lock_path(owner)):
            for name in old_files:
                (directory / name).unlink(missing_ok=True)
        return CompactionReport(str(owner), len(entries), before, live)

    def payload_usage(self, owner: Owner) -> tuple[int, int]:
        """(live record bytes, payload file bytes) of an owner opened in this process; (0, 0) if not."""
        src = self._sources.get(owner)
        if src is None or src.closed or not src.directory.is_dir():
            return 0, 0
        live = sum(e.length for e in src._blocks.values())
        files = sum(p.stat().st_size for p in src.directory.iterdir() if PAYLOAD_RE.match(p.name))
        return live, files

    async def compact_if_wasteful(self, owner: Owner, max_dead_fraction: float = 0.5) -> CompactionReport | None:
        """Compact ``owner`` when more than ``max_dead_fraction`` of its payload bytes belong to no
        block (deleted documents or messages); None when it was not needed."""
        live, files = self.payload_usage(owner)
        if files == 0 or files - live <= max_dead_fraction * files:
            return None
        report = await self.compact(owner)
        log.info("%s: compacted payloads %d -> %d bytes", owner, report.bytes_before, report.bytes_after)
        return report

    async def remove_orphan_directories(self) -> list[Path]:
        """Remove owner directories whose knowledge base or session row is gone (a delete that
        committed, then crashed before removing its files); returns them."""
        root = self.data_dir / "memory"
        found = [
            Owner(kind, int(num))
            for p in (root.iterdir() if root.is_dir() else ())
            if (m := re.match(r"^(kb|session)-(\d+)$", p.name)) and p.is_dir()
            for kind, num in [m.groups()]
        ]
        removed = []
        for owner in found:
            async with self._locks.hold(str(owner), self._lock_path(owner)), self.sessions() as session:
                if await session.get(owner.row_model, owner.id) is not None:
                    continue
                src = self._sources.pop(owner, None)
                if src is not None:
                    src.close()
                shutil.rmtree(owner.directory(self.data_dir), ignore_errors=True)
                removed.append(owner.directory(self.data_dir))
                log.warning("%s: removed the files of a deleted owner", owner)
        return removed

    # ---- maintenance -----------------------------------------------------------------------------
    async def refresh_all(self) -> None:
        for src in list(self._sources.values()):
            await src.refresh()

    def sources(self) -> dict[Owner, PersistentSource]:
        return dict(self._sources)

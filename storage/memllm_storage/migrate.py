"""Run the storage migrations programmatically and check a database is at head.

No ``alembic.ini`` is needed: the configuration points at ``storage/memllm_storage/migrations`` inside the
package. Every function takes an async engine and runs Alembic on one of its connections inside a
transaction (PostgreSQL and SQLite both have transactional DDL here, so a failed upgrade leaves
the previous revision in place).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from memllm_storage.locks import FileLock

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


class DatabaseNotMigratedError(RuntimeError):
    """The database schema is not at the head revision of this code."""


def alembic_config(url: str = "") -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def head_revision() -> str:
    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"storage migrations have {len(heads)} heads: {heads}")
    return heads[0]


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Apply migrations up to ``revision``."""
    await _run(engine, lambda cfg: command.upgrade(cfg, revision))


async def downgrade(engine: AsyncEngine, revision: str = "-1") -> None:
    """Revert migrations down to ``revision`` (``"base"`` drops every table)."""
    await _run(engine, lambda cfg: command.downgrade(cfg, revision))


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision stamped in the database, or None for an empty (unmigrated) database."""

    def read(conn: Connection) -> str | None:
        return MigrationContext.configure(conn).get_current_revision()

    async with engine.connect() as conn:
        return await conn.run_sync(read)


async def create_if_new(engine: AsyncEngine) -> bool:
    """Give an embedded SQLite database that holds no table at all the schema at head (first use of a
    fresh data directory); returns whether it did. A database at an older revision, one with tables
    of its own, and PostgreSQL are left to an explicit ``memllm db upgrade``.

    Processes that start together on one fresh file take turns on ``<file>.schema.lock`` (an
    ``flock``): the first creates the schema, the others then find it."""
    if engine.dialect.name != "sqlite" or not engine.url.database or engine.url.database == ":memory:":
        return False
    if await current_revision(engine) is not None:
        return False
    lock = FileLock(Path(f"{engine.url.database}.schema.lock"))
    await lock.acquire()
    try:
        if await current_revision(engine) is not None or await _has_tables(engine):
            return False
        await upgrade(engine)
        return True
    finally:
        lock.release()


async def _has_tables(engine: AsyncEngine) -> bool:
    def table_names(conn: Connection) -> list[str]:
        return inspect(conn).get_table_names()

    async with engine.connect() as conn:
        return bool(await conn.run_sync(table_names))


async def check_at_head(engine: AsyncEngine) -> None:
    """Raise :class:`DatabaseNotMigratedError` unless the database is at the head revision."""
    current = await current_revision(engine)
    head = head_revision()
    if current != head:
        raise DatabaseNotMigratedError(
            f"database is not migrated: run `memllm db upgrade` (database at {current or 'empty'}, "
            f"code expects {head}; url {engine.url.render_as_string(hide_password=True)})"
        )


async def _run(engine: AsyncEngine, fn) -> None:
    def work(conn: Connection) -> None:
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        fn(cfg)

    async with engine.begin() as conn:
        await conn.run_sync(work)

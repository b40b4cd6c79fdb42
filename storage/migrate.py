"""Run the storage migrations programmatically and check a database is at head.

No ``alembic.ini`` is needed: the configuration points at ``storage/migrations`` inside the
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
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

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

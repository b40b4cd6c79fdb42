"""Async engine and session factory for SQLite (default) or PostgreSQL.

* SQLite (``sqlite+aiosqlite:///path``): every connection runs ``journal_mode=WAL`` (readers never
  block the writer and see only committed data), ``foreign_keys=ON`` (cascades work),
  ``synchronous=FULL`` (a commit is on disk when ``commit()`` returns) and ``busy_timeout`` so
  writers from several processes wait for each other instead of failing.
* PostgreSQL (``postgresql+asyncpg://...``): pool pre-ping; ``search_path`` may be pinned with the
  ``schema`` argument (tests use a fresh schema per test).

Sessions from :func:`session_factory` never expire objects on commit, so rows read inside a
transaction stay usable afterwards without lazy loads (which async sessions cannot do).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

SQLITE_BUSY_TIMEOUT_MS = 30_000


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def is_postgres(url: str) -> bool:
    return make_url(url).get_backend_name() == "postgresql"


def make_engine(url: str, *, schema: str | None = None, echo: bool = False, **kwargs: Any) -> AsyncEngine:
    """Create the async engine for ``url`` (see module docstring for per-backend settings).

    A SQLite file's parent directory is created if missing.
    """
    parsed = make_url(url)
    if is_sqlite(url):
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(url, echo=echo, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        return engine
    if is_postgres(url):
        connect_args = dict(kwargs.pop("connect_args", {}))
        if schema:
            connect_args.setdefault("server_settings", {})["search_path"] = schema
        return create_async_engine(url, echo=echo, pool_pre_ping=True, connect_args=connect_args, **kwargs)
    return create_async_engine(url, echo=echo, **kwargs)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)

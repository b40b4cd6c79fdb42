"""Fixtures: every database test runs on SQLite (temp file) and on the real PostgreSQL.

PostgreSQL: one fresh database per test run (dropped at the end), one fresh schema per test.
An unreachable server fails the ``postgres`` tests (it does not skip them): run .ci/services.sh.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from storage_helpers import store_for

from memllm_storage import migrate
from memllm_storage.engine import make_engine

PG_ADMIN = os.environ.get("MEMLLM_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


async def _pg_admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_database():
    name = f"memllm_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://")
    yield f"{base}/{name}"
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request, tmp_path):
    """(url, schema) of an empty database for this test."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'memllm.db'}", None
        return
    url = request.getfixturevalue("pg_database")
    schema = f"t_{uuid.uuid4().hex[:10]}"
    asyncio.run(_pg_admin_db(url, f"CREATE SCHEMA {schema}"))
    yield url, schema
    asyncio.run(_pg_admin_db(url, f"DROP SCHEMA IF EXISTS {schema} CASCADE"))


async def _pg_admin_db(url: str, sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(url.replace("+asyncpg", ""), timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture
async def engine(db):
    url, schema = db
    eng = make_engine(url, schema=schema)
    yield eng
    await eng.dispose()


@pytest.fixture
async def migrated(db):
    url, schema = db
    eng = make_engine(url, schema=schema)
    await migrate.upgrade(eng)
    await eng.dispose()
    return url, schema


@pytest.fixture
async def store(migrated, tmp_path):
    url, schema = migrated
    s = store_for(url, schema, tmp_path / "data")
    yield s
    await s.close()

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from memllm_storage import migrate
from memllm_storage.models import Base

TABLES = {
    "tenants",
    "api_keys",
    "knowledge_bases",
    "documents",
    "chunks",
    "sessions",
    "messages",
    "memory_blocks",
    "index_state",
}


async def _tables(engine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names())) - {"alembic_version"}


async def test_upgrade_from_empty_matches_models(engine):
    assert await migrate.current_revision(engine) is None
    with pytest.raises(migrate.DatabaseNotMigratedError, match="run `memllm db upgrade`"):
        await migrate.check_at_head(engine)
    await migrate.upgrade(engine)
    assert await migrate.current_revision(engine) == migrate.head_revision()
    await migrate.check_at_head(engine)
    assert await _tables(engine) == TABLES
    async with engine.connect() as conn:
        diff = await conn.run_sync(lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata))
    assert diff == [], f"migrations and models disagree: {diff}"


async def test_downgrade_upgrade_round_trip(engine):
    await migrate.upgrade(engine)
    await migrate.downgrade(engine, "base")
    assert await migrate.current_revision(engine) is None
    assert await _tables(engine) == set()
    with pytest.raises(migrate.DatabaseNotMigratedError):
        await migrate.check_at_head(engine)
    await migrate.upgrade(engine)
    await migrate.check_at_head(engine)
    assert await _tables(engine) == TABLES


async def test_store_open_creates_a_new_sqlite_file_and_refuses_empty_postgres(db, tmp_path):
    url, schema = db
    from memllm_storage import MemoryStore

    if url.startswith("sqlite"):
        store = await MemoryStore.open(url, tmp_path, schema=schema)
        try:
            assert await migrate.current_revision(store.engine) == migrate.head_revision()
            assert await _tables(store.engine) == TABLES
        finally:
            await store.close()
    else:
        with pytest.raises(migrate.DatabaseNotMigratedError, match="database is not migrated"):
            await MemoryStore.open(url, tmp_path, schema=schema)


async def test_store_open_refuses_an_older_revision(db, tmp_path):
    url, schema = db
    from sqlalchemy import text

    from memllm_storage import MemoryStore
    from memllm_storage.engine import make_engine

    engine = make_engine(url, schema=schema)
    try:  # stands for a database written by an older release
        await migrate.upgrade(engine)
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = '0000_older'"))
        assert await migrate.create_if_new(engine) is False
    finally:
        await engine.dispose()
    with pytest.raises(migrate.DatabaseNotMigratedError, match="run `memllm db upgrade`"):
        await MemoryStore.open(url, tmp_path, schema=schema)


async def test_sqlite_file_with_foreign_tables_is_left_alone(tmp_path):
    from sqlalchemy import text

    from memllm_storage.engine import make_engine

    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'other.db'}")
    try:
        async with engine.begin() as conn:
            await conn.execute(text("CREATE TABLE notes (id INTEGER PRIMARY KEY)"))
        assert await migrate.create_if_new(engine) is False
        assert await migrate.current_revision(engine) is None
    finally:
        await engine.dispose()


def test_two_processes_race_to_create_one_fresh_sqlite_file(tmp_path):
    """Two processes open one new file at once: both end at head, the schema made once."""
    import subprocess
    import sys

    db = tmp_path / "fresh.db"
    script = (
        "import asyncio, sys\n"
        "from memllm_storage import migrate\n"
        "from memllm_storage.engine import make_engine\n"
        "async def main():\n"
        "    e = make_engine(sys.argv[1])\n"
        "    created = await migrate.create_if_new(e)\n"
        "    await migrate.check_at_head(e)\n"
        "    await e.dispose()\n"
        "    print(created)\n"
        "asyncio.run(main())\n"
    )
    url = f"sqlite+aiosqlite:///{db}"
    procs = [
        subprocess.Popen([sys.executable, "-c", script, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    assert "True" in [out.strip() for out, _ in outs]
    import sqlite3

    with sqlite3.connect(db) as conn:
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        (version,) = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert names >= TABLES and version == migrate.head_revision()

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from storage import migrate
from storage.models import Base

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


async def test_store_open_refuses_unmigrated(db, tmp_path):
    url, schema = db
    from storage import MemoryStore

    with pytest.raises(migrate.DatabaseNotMigratedError, match="database is not migrated"):
        await MemoryStore.open(url, tmp_path, schema=schema)

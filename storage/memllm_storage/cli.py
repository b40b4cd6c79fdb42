"""Command line: ``memllm db upgrade|downgrade|current`` and ``memllm bench storage``.

Register into the main CLI with::

    from memllm_storage.cli import bench_storage, db
    cli.add_command(db)              # memllm db ...
    bench_group.add_command(bench_storage)   # memllm bench storage (command name "storage")

The database is ``MEMLLM_DATABASE_URL`` (default: SQLite file in ``MEMLLM_DATA_DIR``).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import click

from memllm.settings import get_settings
from memllm_storage import migrate
from memllm_storage.engine import make_engine


def _url(url: str | None) -> str:
    return url or get_settings().resolved_database_url


async def _with_engine(url: str, fn):
    engine = make_engine(url)
    try:
        return await fn(engine)
    finally:
        await engine.dispose()


@click.group("db")
def db() -> None:
    """Database schema migrations."""


_url_option = click.option("--url", default=None, help="database URL (default: from settings)")


@db.command("upgrade")
@click.argument("revision", default="head")
@_url_option
def upgrade_cmd(revision: str, url: str | None) -> None:
    """Apply migrations up to REVISION (default: head)."""
    u = _url(url)
    asyncio.run(_with_engine(u, lambda e: migrate.upgrade(e, revision)))
    rev = asyncio.run(_with_engine(u, migrate.current_revision))
    click.echo(f"database at revision {rev}")


@db.command("downgrade")
@click.argument("revision", default="-1")
@_url_option
def downgrade_cmd(revision: str, url: str | None) -> None:
    """Revert migrations down to REVISION (default: one step; "base" drops every table)."""
    u = _url(url)
    asyncio.run(_with_engine(u, lambda e: migrate.downgrade(e, revision)))
    rev = asyncio.run(_with_engine(u, migrate.current_revision))
    click.echo(f"database at revision {rev or 'base (empty)'}")


@db.command("current")
@_url_option
def current_cmd(url: str | None) -> None:
    """Print the database's revision and whether it is at head."""
    rev = asyncio.run(_with_engine(_url(url), migrate.current_revision))
    head = migrate.head_revision()
    click.echo(f"current: {rev or 'base (empty)'}  head: {head}  {'up to date' if rev == head else 'NOT MIGRATED'}")


@click.command("storage")
@click.option(
    "--sizes",
    default="10000,100000,1000000",
    show_default=True,
    help="index sizes (vectors) for add/search latency",
)
@click.option("--quick", is_flag=True, help="small sizes (2K, 20K) and a small restart test")
@click.option(
    "--restart-vectors",
    type=int,
    default=1_000_000,
    show_default=True,
    help="vectors in the restart-time test",
)
@click.option("--dim", type=int, default=192, show_default=True, help="search dimension (SmolLM2: 3 kv heads x 64)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("bench-results/storage.json"), show_default=True)
@click.option("--workdir", type=click.Path(path_type=Path), default=None, help="scratch dir (default: temp)")
@click.option("--threads", type=int, default=1, show_default=True, help="faiss OpenMP threads")
def bench_storage(
    sizes: str, quick: bool, restart_vectors: int, dim: int, out: Path, workdir: Path | None, threads: int
) -> None:
    """Storage benchmark: block writes, index add/search (flat, IVF), restart, bytes per token."""
    from memllm.bench.storage import run_storage_bench

    if quick:
        sizes, restart_vectors = "2000,20000", 20_000
    run_storage_bench(
        [int(s) for s in sizes.split(",") if s],
        restart_vectors=restart_vectors,
        dim=dim,
        out=out,
        workdir=workdir,
        threads=threads,
    )

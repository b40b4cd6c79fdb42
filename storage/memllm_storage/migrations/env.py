"""Alembic environment: runs on the connection :mod:`memllm_storage.migrate` passes in.

``config.attributes["connection"]`` is a synchronous facade of an async connection (from
``AsyncConnection.run_sync``); migrations run in its transaction.
"""

from __future__ import annotations

from alembic import context

from memllm_storage.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
        render_as_batch=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("storage migrations run through memllm_storage.migrate (memllm db upgrade)")
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()

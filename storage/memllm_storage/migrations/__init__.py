"""Alembic migration scripts of the storage schema (run through :mod:`memllm_storage.migrate`)."""

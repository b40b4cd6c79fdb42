"""Alembic migration scripts of the storage schema (run through :mod:`storage.migrate`)."""

"""Fixtures for chat tests: a tiny random model with the real SmolLM2 tokenizer, a migrated SQLite
store in a temp dir, and the chat service over both."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from chat_helpers import SMALL_MEMORY, make_service, migrated_store, tiny_chat_model


@pytest.fixture(scope="session")
def tiny_chat():
    return tiny_chat_model()


@pytest.fixture
def db_url(tmp_path):
    return f"sqlite+aiosqlite:///{tmp_path / 'memllm.db'}"


@pytest.fixture
async def store(db_url, tmp_path):
    s = await migrated_store(db_url, tmp_path / "data")
    yield s
    await s.close()


@pytest.fixture
def service(tiny_chat, store):
    return make_service(tiny_chat, store, SMALL_MEMORY)

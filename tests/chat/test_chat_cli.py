"""The chat CLI end to end: sessions commands on a real SQLite file, and a persisted chat turn with
the real bundled model (short)."""

from __future__ import annotations

import asyncio
import json

import pytest
from chat_helpers import migrated_store
from click.testing import CliRunner

from memllm import testing
from memllm.chat.cli import chat, sessions
from memllm.settings import get_settings


@pytest.fixture
def model_ready(real_model):
    """The converted bundled model under the test data dir (MEMLLM_MODEL below points at it)."""
    return real_model


@pytest.fixture
def cli_env(tmp_path, monkeypatch):
    data = tmp_path / "data"
    store = asyncio.run(migrated_store(f"sqlite+aiosqlite:///{data / 'memllm.db'}", data))
    asyncio.run(store.close())
    monkeypatch.setenv("MEMLLM_DATA_DIR", str(data))
    monkeypatch.setenv("MEMLLM_MODEL", str(testing.test_data_dir() / "models" / "smollm2-135m-instruct"))
    monkeypatch.setenv("MEMLLM_DTYPE", "float32")
    get_settings.cache_clear()
    yield data
    get_settings.cache_clear()


def _ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def test_sessions_commands_without_a_model(cli_env, tmp_path):
    runner = CliRunner()
    assert "created session 'notes'" in _ok(runner.invoke(sessions, ["create", "notes"]))
    bad = runner.invoke(sessions, ["create", "notes"])
    assert bad.exit_code == 1 and "already exists" in bad.output
    listed = json.loads(_ok(runner.invoke(sessions, ["list", "--json"])))
    assert [s["name"] for s in listed] == ["notes"] and listed[0]["message_count"] == 0
    out = tmp_path / "notes.json"
    _ok(runner.invoke(sessions, ["export", "notes", "-o", str(out)]))
    assert json.loads(out.read_text())["messages"] == []
    missing = runner.invoke(sessions, ["show", "nope"])
    assert missing.exit_code == 1 and "no session named 'nope'" in missing.output
    _ok(runner.invoke(sessions, ["delete", "notes", "--yes"]))
    assert "no sessions" in _ok(runner.invoke(sessions, ["list"]))


@pytest.mark.slow
def test_chat_session_persists_turns_across_runs(model_ready, cli_env, tmp_path, caplog):
    """Two separate `memllm chat --session` runs (two "processes"): the second continues the first,
    from the live state the first spilled when it ended."""
    runner = CliRunner()
    first = _ok(runner.invoke(chat, ["--session", "trip", "--max-tokens", "4"], input="My name is Ada.\n\n"))
    assert "created session 'trip'" in first and "bot> " in first
    assert len(list(cli_env.glob("memory/session-*/live-state.pt"))) == 1
    caplog.set_level("INFO", logger="memllm.chat.service")
    second = _ok(runner.invoke(chat, ["--session", "trip", "--max-tokens", "4"], input="What is my name?\n\n"))
    assert "session 'trip': 2 messages" in second
    assert "restored the spilled window" in caplog.text
    shown = json.loads(_ok(runner.invoke(sessions, ["show", "trip", "--json"])))
    assert [m["role"] for m in shown["messages"]] == ["user", "assistant", "user", "assistant"]
    assert shown["messages"][0]["content"] == "My name is Ada."
    page = _ok(runner.invoke(sessions, ["show", "trip", "--limit", "2"]))
    assert "[2] user: What is my name?" in page and "(older: --before 2)" in page

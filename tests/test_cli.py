"""The CLI as a user meets it: a real subprocess, the real bundled model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from memllm.testing import test_data_dir


def memllm(*args: str, env_extra: dict | None = None, stdin: str | None = None, timeout: int = 300):
    env = {**os.environ, "MEMLLM_DATA_DIR": str(test_data_dir()), "MEMLLM_THREADS": "2", **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "memllm.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        input=stdin,
        timeout=timeout,
    )


@pytest.mark.slow
def test_generate_streams_a_sensible_answer(real_model):
    r = memllm("generate", "--max-tokens", "20", "What is the capital of France?")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout


@pytest.mark.slow
def test_chat_answers_in_the_context_of_earlier_turns(real_model):
    """Greedy replies: the answer to the second question depends on the first turn being in context."""
    question = "What is my favourite colour?"
    both = memllm(
        "chat", "--max-tokens", "25", "--mode", "full", stdin=f"My favourite colour is green.\n{question}\n\n"
    )
    alone = memllm("chat", "--max-tokens", "25", "--mode", "full", stdin=f"{question}\n\n")
    assert both.returncode == 0 and alone.returncode == 0, both.stderr + alone.stderr
    replies = [r.split("\nyou>")[0].strip() for r in both.stdout.split("bot>")[1:]]
    assert len(replies) == 2 and all(replies)
    assert replies[1] != alone.stdout.split("bot>")[1].split("\nyou>")[0].strip()


@pytest.mark.slow
def test_info_lists_model_and_settings(real_model):
    r = memllm("info", env_extra={"MEMLLM_MEMORY_TOP_K": "9", "MEMLLM_CHAT_SPILL": "3"})
    assert r.returncode == 0, r.stderr
    assert "30 layers" in r.stdout and "memory.top_k" in r.stdout and " 9" in r.stdout
    assert "4 live sessions in memory, 3 on disk" in r.stdout


def test_errors_are_one_clear_line(tmp_path):
    r = memllm("generate", "hi", env_extra={"MEMLLM_MODEL": str(tmp_path / "nope")})
    assert r.returncode == 1
    assert r.stderr.strip().startswith("memllm: error: model")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bad_setting_is_reported_without_traceback():
    r = memllm("info", env_extra={"MEMLLM_MEMORY_TOP_K": "many"})
    assert r.returncode != 0
    assert "MEMLLM_MEMORY_TOP_K" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_a_fresh_data_directory_just_works(real_model, tmp_path):
    """The embedded SQLite default creates its schema on first use: no `memllm db upgrade` first."""
    fresh = tmp_path / "data"
    fresh.mkdir()
    (fresh / "models").symlink_to(test_data_dir() / "models")  # the converted model, not its database
    env = {"MEMLLM_DATA_DIR": str(fresh)}
    text = "The lighthouse keeper on Farn Island is named Grace Darling."
    r = memllm("ingest", "--kb", "notes", "--text", text, "--name", "keeper", "--quiet", env_extra=env)
    assert r.returncode == 0, r.stderr
    assert "1 ingested" in r.stdout and (fresh / "memllm.db").is_file()
    r = memllm("ask", "--kb", "notes", "--max-tokens", "16", "Who keeps the lighthouse?", env_extra=env)
    assert r.returncode == 0, r.stderr
    assert "keeper (doc 1" in r.stdout
    for command in (("kb", "list"), ("sessions", "list")):
        r = memllm(*command, env_extra=env)
        assert r.returncode == 0 and "not migrated" not in r.stderr, r.stderr

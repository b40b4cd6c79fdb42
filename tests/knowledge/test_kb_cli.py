"""The knowledge CLI end to end (tiny random model, real SQLite file in a temp data directory)."""

from __future__ import annotations

import asyncio
import json

import pytest
from click.testing import CliRunner
from kb_helpers import PARAGRAPHS, TINY_MEMORY, shared_embedder

from memllm.knowledge import cli as kcli
from memllm.settings import Settings
from memllm_storage import migrate
from memllm_storage.engine import make_engine


@pytest.fixture
def cli_env(tmp_path, monkeypatch, kb_engine):
    settings = Settings(data_dir=tmp_path / "data", memory=TINY_MEMORY)

    async def upgrade():
        eng = make_engine(settings.resolved_database_url)
        await migrate.upgrade(eng)
        await eng.dispose()

    asyncio.run(upgrade())
    monkeypatch.setattr(kcli, "_settings", lambda: settings)
    monkeypatch.setattr(kcli, "_engine", lambda s: kb_engine)
    monkeypatch.setattr("memllm.knowledge.embeddings.Embedder", lambda *a, **k: shared_embedder())
    monkeypatch.setattr("memllm.knowledge.service.Embedder", lambda *a, **k: shared_embedder())
    return settings


def run(*args):
    result = CliRunner().invoke(kcli.kb if args[0] == "kb" else getattr(kcli, args[0]), list(args[1:]))
    return result


def test_cli_flow(cli_env, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("\n\n".join(PARAGRAPHS))
    (docs / "empty.txt").write_text("")
    r = run("kb", "create", "notes", "--description", "test notes")
    assert r.exit_code == 0, r.output
    r = run("ingest", str(docs), "--kb", "notes", "--quiet")
    assert r.exit_code == 0, r.output
    assert "1 ingested, 0 unchanged (skipped), 1 failed" in r.output and "empty file" in r.output
    r = run("ingest", str(docs), "--kb", "notes", "--json")
    assert [x["status"] for x in json.loads(r.output)["results"]] == ["skipped", "error"]
    r = run("search", "copper whale", "--kb", "notes", "--json")
    hits = json.loads(r.output)
    assert hits and hits[0]["source_name"] == "docs/a.txt" and "copper whale" in hits[0]["snippet"]
    r = run("ask", "What froze?", "--kb", "notes", "--mode", "memory", "--max-tokens", "4", "--json")
    assert r.exit_code == 0, r.output
    ans = json.loads(r.output)
    assert ans["memory_trace"] and ans["citations"] and ans["usage"]["completion_tokens"] <= 4
    r = run("summarize", "--kb", "notes", "--doc", "docs/a.txt", "--max-tokens", "4", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["parts"][0]["passages"]
    r = run("kb", "docs", "notes")
    assert "ready" in r.output and "error" in r.output
    r = run("kb", "list")
    assert "notes" in r.output and "1/2 documents ready" in r.output
    r = run("kb", "docs", "notes", "--delete", "docs/a.txt")
    assert r.exit_code == 0
    r = run("search", "copper whale", "--kb", "notes")
    assert "no results" in r.output
    r = run("ask", "x", "--kb", "missing")
    assert r.exit_code == 1 and "memllm: error: knowledge base 'missing' not found" in r.output
    r = run("kb", "delete", "notes", "--yes")
    assert r.exit_code == 0 and "deleted" in r.output

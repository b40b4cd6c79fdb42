"""``memllm bench ingest`` on the tiny model: every part timed on the same tokens, ratios derived."""

from __future__ import annotations

import json

import pytest
from kb_helpers import PARAGRAPHS

from memllm.bench.ingest import load_documents, measure, table_rows
from memllm.settings import Settings


def test_documents_from_jsonl_folder_and_file(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(json.dumps({"input": "one"}) + "\n\n" + json.dumps({"input": "two"}) + "\n")
    assert load_documents(jsonl, None) == [("docs-0", "one"), ("docs-2", "two")]
    assert load_documents(jsonl, 1) == [("docs-0", "one")]
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("bee")
    (folder / "sub" / "a.txt").write_text("ay")
    assert load_documents(folder, None) == [("b.txt", "bee"), ("a.txt", "ay")]
    assert load_documents(folder / "b.txt", None) == [("b.txt", "bee")]
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no documents"):
        load_documents(tmp_path / "empty.jsonl", None)


async def test_measure_times_every_part_on_the_same_tokens(tmp_path, kb_engine):
    long_text = "\n\n".join(PARAGRAPHS * 12)  # past the tiny model's 1,024 trained positions
    docs = [("short", PARAGRAPHS[0]), ("long", long_text)]
    settings = Settings(data_dir=tmp_path / "data", memory=kb_engine.memory_settings)
    result = await measure(docs, settings, engine=kb_engine, log=lambda _: None)
    rows = {r["document"]: r for r in result["documents"]}
    assert set(rows) == {"short", "long"}
    assert rows["long"]["tokens"] > kb_engine.model.config.max_positions
    assert all(r[k] > 0 for r in rows.values() for k in ("ingest_s", "model_read_s", "full_prefill_s"))
    assert result["total"]["tokens"] == rows["short"]["tokens"] + rows["long"]["tokens"]
    table = table_rows(result)
    assert [t["document"] for t in table] == ["short", "long", "all"]
    total = table[-1]
    expected = result["total"]["full_prefill_s"] / result["total"]["ingest_s"]
    assert total["ingest / full"] == pytest.approx(expected, abs=1e-3)

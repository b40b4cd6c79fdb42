"""Ingestion through the service (tiny random model, real SQLite file, real FAISS, real embedder):
statuses, content-hash skip, atomic replace, delete, bad files, resume after interruption.

The central promise: after a delete or a replace, no search result, answer citation or memory
trace ever points at the old content."""

from __future__ import annotations

import itertools
import json
import sqlite3

import numpy as np
import pytest
from kb_helpers import PARAGRAPHS
from sqlalchemy import func, select

from memllm.knowledge.service import KnowledgeError
from memllm_storage import Owner
from memllm_storage.models import Chunk, Document, MemoryBlockRow

OLD = "The secret ingredient of the harbour soup is saffron from the eastern hills."
NEW = "The secret ingredient of the harbour soup is nutmeg from the island market."


def doc_text(extra: str, repeat: int = 2) -> str:
    return "\n\n".join([*PARAGRAPHS * repeat, extra, *PARAGRAPHS[:2]])


async def count(svc, model, **where):
    async with svc.store.sessions() as s:
        q = select(func.count(model.id))
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return (await s.execute(q)).scalar_one()


async def test_ingest_statuses_rows_blocks_and_provenance(svc, tmp_path):
    events = []
    db_file = svc.store.data_dir / "memllm.db"
    seen_in_db = []

    def progress(event, info):
        events.append((event, info.get("status")))
        if event == "tokens" and not seen_in_db:  # the row is visible (status encoding) while the model reads
            with sqlite3.connect(db_file) as conn:
                seen_in_db.append(conn.execute("select status from documents where source_name='a.txt'").fetchone()[0])

    text = doc_text(OLD)
    res = await svc.ingest_text("kb", "a.txt", text, meta={"lang": "en"}, progress=progress)
    assert res.status == "ready" and res.error is None
    statuses = [s for e, s in events if e == "status"]
    assert statuses == ["parsing", "encoding", "ready"]
    assert seen_in_db == ["encoding"]
    doc = await svc.get_document("kb", "a.txt")
    assert (doc.status, doc.meta, doc.char_count, doc.token_count) == ("ready", {"lang": "en"}, len(text), res.tokens)
    # every token of the document lies in exactly one block, and blocks point at the chunk they overlap most
    async with svc.store.sessions() as s:
        blocks = (
            (
                await s.execute(
                    select(MemoryBlockRow)
                    .where(MemoryBlockRow.document_id == doc.id)
                    .order_by(MemoryBlockRow.token_start)
                )
            )
            .scalars()
            .all()
        )
        chunks = {c.id: c for c in (await s.execute(select(Chunk).where(Chunk.document_id == doc.id))).scalars()}
    assert len(blocks) == res.blocks and len(chunks) == res.chunks
    spans = [(b.token_start, b.token_end) for b in blocks]
    assert spans[0][0] == 1 and spans[-1][1] == res.tokens  # token 0 (the attention sink) is not kept
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    for b in blocks:
        c = chunks[b.chunk_id]
        best = max(chunks.values(), key=lambda x: min(x.token_end, b.token_end) - max(x.token_start, b.token_start))
        assert min(c.token_end, b.token_end) - max(c.token_start, b.token_start) == min(
            best.token_end, b.token_end
        ) - max(best.token_start, b.token_start)
        assert text[c.char_start : c.char_end] == c.text
    src = await svc.store.open_source(Owner.kb(doc.knowledge_base_id))
    assert src.num_blocks() == len(blocks)


async def test_unchanged_document_is_skipped(svc):
    first = await svc.ingest_text("kb", "a.txt", doc_text(OLD))
    calls = []
    again = await svc.ingest_text("kb", "a.txt", doc_text(OLD), progress=lambda e, i: calls.append(e))
    assert again.status == "skipped" and again.document_id == first.document_id
    assert "tokens" not in calls  # the model did not read it again
    assert await count(svc, Document) == 1
    assert await count(svc, MemoryBlockRow) == first.blocks


async def _everything_cited(svc, question: str) -> list:
    """Every search hit, answer citation and memory-trace citation for ``question`` (all modes)."""
    out = [h for m in ("hybrid", "bm25", "embeddings") for h in await svc.search("kb", question, k=20, method=m)]
    for mode in ("rag", "memory", "hybrid"):
        ans = await svc.ask("kb", question, mode=mode, restrict="none", max_tokens=6, trace_blocks=50)
        out += ans.citations
        out += [t.citation for t in ans.trace if t.citation]
        assert all(t.document_id is not None for t in ans.trace)
        assert mode == "rag" or ans.trace  # memory was read
    return out


async def chunk_texts(svc) -> dict[int, str]:
    async with svc.store.sessions() as s:
        return {c.id: c.text for c in (await s.execute(select(Chunk))).scalars()}


async def _soup_chunks(svc, doc_id: int) -> list[Chunk]:
    async with svc.store.sessions() as s:
        return list((await s.execute(select(Chunk).where(Chunk.document_id == doc_id))).scalars())


async def test_replace_is_atomic_and_forgets_the_old_version(svc):
    v1 = await svc.ingest_text("kb", "soup.txt", doc_text(OLD))
    await svc.ingest_text("kb", "other.txt", "\n\n".join(PARAGRAPHS[2:]))
    old_texts = await chunk_texts(svc)
    cited = await _everything_cited(svc, "secret ingredient saffron soup")
    assert any("saffron" in old_texts[c.chunk_id] for c in cited)  # the old content is found while it exists
    assert any(c.document_id == v1.document_id for c in cited)

    # an interrupted replacement leaves the old version fully in place
    calls = {"n": 0}

    def stop():
        calls["n"] += 1
        return calls["n"] > 2

    with pytest.raises(InterruptedError):
        await svc.ingest_text("kb", "soup.txt", doc_text(NEW), should_stop=stop)
    doc = await svc.get_document("kb", "soup.txt")
    assert (doc.id, doc.status) == (v1.document_id, "ready")
    hits = await svc.search("kb", "secret ingredient soup", k=3)
    assert hits[0].document_id == v1.document_id and "saffron" in old_texts[hits[0].chunk_id]
    assert "saffron" in hits[0].snippet  # the snippet is the sentence that matches the query

    old_soup = {c.id for c in await _soup_chunks(svc, v1.document_id)}
    v2 = await svc.ingest_text("kb", "soup.txt", doc_text(NEW))
    assert v2.status == "ready" and v2.replaced_id == v1.document_id == v2.document_id  # the id stays
    cited = await _everything_cited(svc, "secret ingredient saffron soup")
    texts = await chunk_texts(svc)
    assert cited and all(c.chunk_id in texts for c in cited)  # only live chunks
    assert not any(c.chunk_id in old_soup for c in cited)  # no chunk of the old version
    assert not any("saffron" in texts[c.chunk_id] or "saffron" in c.snippet for c in cited)
    assert any("nutmeg" in texts[c.chunk_id] for c in cited)
    assert not set(texts) & old_soup  # the old version's chunks and blocks are gone
    assert await count(svc, MemoryBlockRow, document_id=v1.document_id) == v2.blocks
    assert await count(svc, Chunk, document_id=v1.document_id) == v2.chunks
    # the FAISS indexes hold only live blocks: search every layer with random queries
    kb = await svc.get_kb("kb")
    src = await svc.store.open_source(Owner.kb(kb.id))
    live = set(src.block_ids().tolist())
    async with svc.store.sessions() as s:
        rows = set(
            (await s.execute(select(MemoryBlockRow.id).where(MemoryBlockRow.knowledge_base_id == kb.id))).scalars()
        )
    assert live == rows
    rng = np.random.default_rng(0)
    for layer in src.layout.layers:
        _, ids = src.search(layer, rng.standard_normal((8, src.layout.search_dim)).astype(np.float32), 64)
        assert set(ids[ids >= 0].tolist()) <= live


async def test_delete_forgets_everywhere(svc):
    a = await svc.ingest_text("kb", "soup.txt", doc_text(OLD))
    await svc.ingest_text("kb", "other.txt", "\n\n".join(PARAGRAPHS[2:]))
    assert await svc.delete_document("kb", a.document_id)
    assert not await svc.delete_document("kb", a.document_id)
    assert [d.source_name for d in await svc.list_documents("kb")] == ["other.txt"]
    cited = await _everything_cited(svc, "secret ingredient saffron soup")
    texts = await chunk_texts(svc)
    assert cited and all(c.chunk_id in texts and c.document_id != a.document_id for c in cited)
    assert not any("saffron" in texts[c.chunk_id] for c in cited)
    assert await count(svc, MemoryBlockRow, document_id=a.document_id) == 0
    # deleting the last document leaves nothing to answer from
    await svc.delete_document("kb", "other.txt")
    assert await svc.search("kb", "soup", k=5) == []
    with pytest.raises(KnowledgeError, match="no ready documents"):
        await svc.ask("kb", "What is in the soup?", mode="memory")


async def test_bad_files_reported_and_skipped(svc, tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "good.txt").write_text(doc_text(OLD, repeat=1))
    (d / "sub" / "notes.md").write_text("# Notes\n\n" + PARAGRAPHS[3])
    (d / "empty.txt").write_text("")
    (d / "binary.txt").write_bytes(b"\x00\x01\x02" * 100)
    (d / "broken.pdf").write_bytes(b"%PDF-1.4 nothing useful")
    (d / "huge.txt").write_text("big " * 5000)
    (d / "ignored.bin").write_bytes(b"\x00" * 10)
    svc.max_bytes = 10_000
    report = await svc.ingest_paths("kb", [d])
    by_name = {r.source_name.split("/", 1)[1]: r for r in report.results}
    assert set(by_name) == {"good.txt", "sub/notes.md", "empty.txt", "binary.txt", "broken.pdf", "huge.txt"}
    assert {n for n, r in by_name.items() if r.status == "ready"} == {"good.txt", "sub/notes.md"}
    reasons = {n: r.error for n, r in by_name.items() if r.status == "error"}
    assert "empty" in reasons["empty.txt"] and "binary" in reasons["binary.txt"]
    assert "PDF" in reasons["broken.pdf"] and "too large" in reasons["huge.txt"]
    # errors are visible as documents with status error and hold no content
    docs = {x.source_name.split("/", 1)[1]: x for x in await svc.list_documents("kb")}
    for name in reasons:
        assert docs[name].status == "error" and docs[name].error
        assert await count(svc, Chunk, document_id=docs[name].id) == 0
        assert await count(svc, MemoryBlockRow, document_id=docs[name].id) == 0
    # include / exclude globs
    report = await svc.ingest_paths("kb", [d], include=["*.md"])
    assert [r.source_name for r in report.results] == ["docs/sub/notes.md"]
    assert report.results[0].status == "skipped"


async def test_interrupted_directory_ingestion_resumes(svc, tmp_path):
    d = tmp_path / "many"
    d.mkdir()
    for i in range(4):
        (d / f"doc{i}.txt").write_text(f"Document number {i}.\n\n" + "\n\n".join(PARAGRAPHS[i:] + PARAGRAPHS[:i]))
    read: list[str] = []

    def progress(event, info):
        if event == "start":
            read.append(info["source"])

    with pytest.raises(InterruptedError):
        await svc.ingest_paths("kb", [d], progress=progress, should_stop=lambda: len(read) == 3)
    assert read == ["many/doc0.txt", "many/doc1.txt", "many/doc2.txt"]
    docs = {x.source_name: x.status for x in await svc.list_documents("kb")}
    assert docs == {"many/doc0.txt": "ready", "many/doc1.txt": "ready", "many/doc2.txt": "encoding"}
    assert await count(svc, Chunk, document_id=(await svc.get_document("kb", "many/doc2.txt")).id) == 0

    read.clear()
    report = await svc.ingest_paths("kb", [d], progress=progress)
    assert [r.status for r in report.results] == ["skipped", "skipped", "ready", "ready"]
    assert read == ["many/doc2.txt", "many/doc3.txt"]  # the model read only what was missing
    assert {x.status for x in await svc.list_documents("kb")} == {"ready"}
    assert len(await svc.list_documents("kb")) == 4


async def test_json_lines_become_documents_and_kb_lifecycle(svc, tmp_path):
    f = tmp_path / "records.jsonl"
    f.write_text("\n".join(json.dumps({"text": p, "id": i}) for i, p in enumerate(PARAGRAPHS[:2], 1)))
    report = await svc.ingest_paths("kb", [f])
    assert [r.source_name for r in report.results] == ["records.jsonl#0", "records.jsonl#1"]
    infos = {i.name: i for i in await svc.list_kbs()}
    assert infos["kb"].ready == 2 and infos["kb"].blocks > 0
    with pytest.raises(KnowledgeError):
        await svc.create_kb("kb")
    kb = await svc.get_kb("kb")
    assert svc.chunks.embedding_cache(kb.id).exists()
    assert await svc.delete_kb("kb")
    assert not svc.chunks.embedding_cache(kb.id).exists()
    assert not (svc.store.data_dir / "knowledge" / f"kb-{kb.id}").exists()
    assert not (svc.store.data_dir / "memory" / f"kb-{kb.id}").exists()
    assert await svc.list_kbs() == []
    assert await count(svc, MemoryBlockRow) == 0 and await count(svc, Chunk) == 0


def test_progress_bars_show_counts_and_the_document_being_read(capsys):
    from types import SimpleNamespace

    from memllm.knowledge.service import _progress_bars

    with _progress_bars(True, 2, 100) as emit:
        emit("start", {"source": "a.txt", "tokens": 40})
        emit("tokens", {"source": "a.txt", "n": 40})
        emit("done", {"result": SimpleNamespace(status="ready", source_name="a.txt", error=None)})
        emit("start", {"source": "b.bin", "tokens": 0})
        emit("done", {"result": SimpleNamespace(status="error", source_name="b.bin", error="b.bin: binary file")})
    out, err = capsys.readouterr()
    assert "reading a.txt" in err and "ready=1 | reading b.bin" in err and "ready=1, error=1" in err
    assert "skipped b.bin: b.bin: binary file" in out + err

"""Ingestions racing with deletes and with each other, stable ids on replace, disk given back.

The model's read of a document is held open (a gate around ``encode_document``) so that a delete or a
second upload lands while the first ingestion is in flight, as it does on a busy server.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest
from kb_helpers import PARAGRAPHS
from sqlalchemy import func, select

from memllm.knowledge import service as service_module
from memllm.knowledge.staging import StagedText
from memllm_storage import NotFoundError, Owner
from memllm_storage.models import Chunk, Document, KnowledgeBase, MemoryBlockRow
from memllm_storage.repositories import DocumentRepository

OLD = " ".join(PARAGRAPHS[:2])
NEW = " ".join(PARAGRAPHS[2:])


class Gate:
    """Holds every ``encode_document`` call until :meth:`open`; :meth:`entered` waits for the first."""

    def __init__(self, monkeypatch) -> None:
        self._inside = threading.Event()
        self._go = threading.Event()
        real = service_module.encode_document

        def gated(*args, **kwargs):
            self._inside.set()
            assert self._go.wait(60), "the gate was never opened"
            return real(*args, **kwargs)

        monkeypatch.setattr(service_module, "encode_document", gated)

    async def entered(self) -> None:
        assert await asyncio.to_thread(self._inside.wait, 60), "the model never started reading"

    def open(self) -> None:
        self._go.set()


async def _count(svc, model, **where) -> int:
    async with svc.store.sessions() as s:
        q = select(func.count()).select_from(model)
        for k, v in where.items():
            q = q.where(getattr(model, k) == v)
        return int((await s.execute(q)).scalar_one())


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


async def test_a_document_deleted_while_read_is_not_brought_back(svc, monkeypatch):
    gate = Gate(monkeypatch)
    events: list[tuple[str, str | None]] = []
    task = asyncio.create_task(
        svc.ingest_text("kb", "new.txt", NEW, progress=lambda e, i: events.append((e, i.get("status"))))
    )
    await gate.entered()
    doc = await svc.get_document("kb", "new.txt")
    assert doc.status == "encoding" and svc.staging.has_text(doc.id)
    assert await svc.delete_document("kb", doc.id)
    gate.open()
    result = await task
    assert result.status == "deleted" and "deleted while it was being read" in result.error
    assert ("status", "deleted") in events and ("status", "ready") not in events
    with pytest.raises(NotFoundError):
        await svc.get_document("kb", "new.txt")
    assert await _count(svc, Document) == 0
    assert await _count(svc, Chunk) == 0 and await _count(svc, MemoryBlockRow) == 0
    assert not svc.staging.has_text(doc.id)
    assert await svc.search("kb", "granite quarry pier", k=3) == []


async def test_a_ready_document_deleted_during_its_replacement_stays_deleted(svc, monkeypatch):
    v1 = await svc.ingest_text("kb", "soup.txt", OLD)
    assert v1.status == "ready"
    gate = Gate(monkeypatch)
    task = asyncio.create_task(svc.ingest_text("kb", "soup.txt", NEW))
    await gate.entered()
    assert (await svc.get_document("kb", "soup.txt")).status == "ready"  # the old version still answers
    assert await svc.delete_document("kb", v1.document_id)
    gate.open()
    result = await task
    assert result.status == "deleted"
    with pytest.raises(NotFoundError):
        await svc.get_document("kb", "soup.txt")
    assert await _count(svc, Document) == 0 and await _count(svc, MemoryBlockRow) == 0
    assert await svc.search("kb", "granite quarry pier", k=3) == []


async def test_two_uploads_of_one_new_name_the_newer_text_wins(svc, monkeypatch):
    gate = Gate(monkeypatch)
    events: list[dict] = []
    first = asyncio.create_task(svc.ingest_text("kb", "notes.txt", OLD))
    await gate.entered()
    second = asyncio.create_task(
        svc.ingest_text("kb", "notes.txt", NEW, progress=lambda e, i: events.append(dict(i, event=e)))
    )
    await asyncio.sleep(0.05)
    assert not second.done()  # it waits for the first instead of sharing its pending row
    gate.open()
    r1, r2 = await asyncio.gather(first, second)
    assert (r1.status, r2.status) == ("ready", "ready")
    assert r1.document_id == r2.document_id  # one row, filled twice
    queued = [e for e in events if e.get("status") == "queued"]
    assert queued and queued[0]["document_id"] == r1.document_id  # told at once which row it will fill
    doc = await svc.get_document("kb", "notes.txt")
    assert doc.status == "ready" and doc.sha256 == service_module.sha256_text(NEW)
    assert (await svc.document_text("kb", doc.id)).strip() == NEW.strip()
    assert await _count(svc, Document) == 1
    assert await _count(svc, Chunk) == r2.chunks and await _count(svc, MemoryBlockRow) == r2.blocks


async def test_a_name_created_by_another_process_meanwhile_is_filled_not_failed(svc, monkeypatch):
    """Another process commits its pending row between our look-up and our insert (the unique
    constraint race): we fill that row instead of dying with an IntegrityError."""
    kb = await svc.get_kb("kb")
    real = DocumentRepository.get_by_source
    calls = {"n": 0}

    async def racing(self, kb_id, source_name):
        calls["n"] += 1
        if calls["n"] == 1:  # our first look-up: the other process inserts right after it
            async with svc.store.sessions() as s:
                await DocumentRepository(s).create(kb_id, source_name, sha256="0" * 64, status="encoding")
                await s.commit()
            return None
        return await real(self, kb_id, source_name)

    monkeypatch.setattr(DocumentRepository, "get_by_source", racing)
    result = await svc.ingest_text("kb", "raced.txt", NEW)
    monkeypatch.undo()
    assert result.status == "ready", result.error
    doc = await svc.get_document("kb", "raced.txt")
    assert (doc.id, doc.status) == (result.document_id, "ready") and doc.knowledge_base_id == kb.id
    assert (await svc.document_text("kb", doc.id)).strip() == NEW.strip()
    assert not svc.staging.has_text(doc.id)  # the other process's files are not ours to touch


async def test_replacing_keeps_the_document_id(svc):
    v1 = await svc.ingest_text("kb", "soup.txt", OLD)
    before = await svc.get_document("kb", v1.document_id)
    await asyncio.sleep(0.01)
    v2 = await svc.ingest_text("kb", "soup.txt", NEW)
    assert v2.status == "ready" and v2.document_id == v1.document_id == v2.replaced_id
    after = await svc.get_document("kb", v1.document_id)
    assert after.status == "ready" and after.updated_at > before.updated_at
    assert (await svc.document_text("kb", v1.document_id)).strip() == NEW.strip()
    assert await _count(svc, Chunk, document_id=v1.document_id) == v2.chunks


async def test_deleting_what_was_added_gives_the_disk_back(svc):
    base = await svc.ingest_text("kb", "base.txt", OLD)
    kb = await svc.get_kb("kb")
    directory = Owner.kb(kb.id).directory(svc.store.data_dir)
    size_before = _dir_bytes(directory)
    added = []
    for i in range(4):
        text = " ".join(PARAGRAPHS[(i + j) % len(PARAGRAPHS)] for j in range(4)) + f" Edition {i}."
        added.append(await svc.ingest_text("kb", f"extra-{i}.txt", text))
    assert all(r.status == "ready" for r in added)
    size_full = _dir_bytes(directory)
    assert size_full > 2 * size_before
    for r in added:
        assert await svc.delete_document("kb", r.document_id)
    live, files = svc.store.payload_usage(Owner.kb(kb.id))
    assert files - live <= files / 2  # never more than half of the payload bytes dead
    assert _dir_bytes(directory) < size_before + (size_full - size_before) / 4
    # the compacted memory still answers, and a reopened store reads it
    hits = await svc.search("kb", "harbour froze nets", k=2)
    assert hits and hits[0].document_id == base.document_id
    assert (await svc.ask("kb", "When did the harbour freeze?", mode="memory", max_tokens=2)).trace


async def test_files_of_a_delete_that_crashed_before_its_cleanup_are_removed(svc):
    other = await svc.create_kb("other")
    assert (await svc.ingest_text("other", "a.txt", OLD)).status == "ready"
    directory = Owner.kb(other.id).directory(svc.store.data_dir)
    assert directory.is_dir()
    async with svc.store.sessions() as s:  # the delete committed; the process died before the cleanup
        await s.delete(await s.get(KnowledgeBase, other.id))
        await s.commit()
    svc.staging.stage(987654, StagedText("ghost.txt", OLD, "text/plain", {}))
    kept = await svc.ingest_text("kb", "kept.txt", NEW)
    await svc.recover_interrupted()
    assert not directory.exists()
    assert not svc.staging.has_text(987654)
    assert (await svc.get_document("kb", kept.document_id)).status == "ready"
    assert Owner.kb((await svc.get_kb("kb")).id).directory(svc.store.data_dir).is_dir()

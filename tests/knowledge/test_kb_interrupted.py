"""Ingestions that die half-way: found, marked ``error`` with the reason, retried from the kept text.

A crash is simulated the way the kernel leaves it: a row in a reading status, its staged text on
disk, and nobody holding its lock (the real SIGKILL is in tests/api/test_interrupted_ingestion.py).
"""

from __future__ import annotations

import pytest
from kb_helpers import PARAGRAPHS

from memllm.knowledge.service import KnowledgeError
from memllm.knowledge.staging import IngestStaging, StagedText
from memllm_storage.repositories import DocumentRepository

TEXT = " ".join(PARAGRAPHS)


async def _stuck_document(svc, name: str, status: str, *, keep_text: bool = True) -> int:
    kb = await svc.get_kb("kb")
    doc_id = await svc._pending_row(kb.id, name, "0" * 64, "text/plain", {"lang": "en"}, None)
    async with svc.store.sessions() as s:
        await DocumentRepository(s).set_status(doc_id, status)
        await s.commit()
    if keep_text:
        svc.staging.stage(doc_id, StagedText(name, TEXT, "text/plain", {"lang": "en"}))
    return doc_id


async def test_interrupted_documents_are_marked_and_retried(svc):
    encoding = await _stuck_document(svc, "ledger.txt", "encoding")
    lost = await _stuck_document(svc, "lost.txt", "parsing", keep_text=False)
    assert sorted(await svc.recover_interrupted()) == sorted([encoding, lost])

    row = await svc.get_document("kb", encoding)
    assert row.status == "error" and row.error.startswith("interrupted") and "retry it" in row.error
    assert svc.retryable(row)
    gone = await svc.get_document("kb", lost)
    assert gone.status == "error" and "ingest it again" in gone.error and not svc.retryable(gone)
    with pytest.raises(KnowledgeError, match="not kept"):
        await svc.staged_for_retry("kb", lost)

    staged = await svc.staged_for_retry("kb", encoding)
    assert (staged.name, staged.text, staged.meta) == ("ledger.txt", TEXT, {"lang": "en"})
    result = await svc.ingest_text("kb", staged.name, staged.text, meta=staged.meta)
    assert result.status == "ready" and result.document_id == encoding  # the same row, now ready
    row = await svc.get_document("kb", encoding)
    assert row.status == "ready" and row.meta == {"lang": "en"} and not svc.retryable(row)
    assert not svc.staging.has_text(encoding)
    assert (await svc.document_text("kb", encoding)).strip() == TEXT.strip()
    with pytest.raises(KnowledgeError, match="only a failed ingestion"):
        await svc.staged_for_retry("kb", encoding)
    assert await svc.recover_interrupted() == []


async def test_a_document_being_read_is_not_taken_for_interrupted(svc):
    doc_id = await _stuck_document(svc, "busy.txt", "encoding")
    other_reader = IngestStaging(svc.staging.root)  # another process's view of the same files
    with svc.staging.reading(doc_id):
        assert other_reader.is_being_read(doc_id)
        assert await svc.recover_interrupted() == []
        with pytest.raises(BlockingIOError), other_reader.reading(doc_id):
            pass
    assert not other_reader.is_being_read(doc_id)
    assert await svc.recover_interrupted() == [doc_id]


async def test_finished_and_refused_documents_leave_no_staged_text(svc):
    ok = await svc.ingest_text("kb", "fine.txt", TEXT)
    assert ok.status == "ready" and not svc.staging.has_text(ok.document_id)
    bad = await svc.ingest_text("kb", "blank.txt", "   \n  ")
    assert bad.status == "error" and (bad.document_id is None or not svc.staging.has_text(bad.document_id))
    assert not list(svc.staging.root.glob("*.json"))


async def test_an_unexpected_failure_is_recorded_with_a_retry(svc, monkeypatch):
    def broken(*args, **kwargs):
        raise MemoryError("out of memory while reading")

    monkeypatch.setattr("memllm.knowledge.service.encode_document", broken)
    result = await svc.ingest_text("kb", "big.txt", TEXT)
    assert result.status == "error" and "MemoryError" in result.error and "retry it" in result.error
    row = await svc.get_document("kb", "big.txt")
    assert row.status == "error" and svc.retryable(row)
    monkeypatch.undo()
    staged = await svc.staged_for_retry("kb", row.id)
    assert (await svc.ingest_text("kb", staged.name, staged.text)).status == "ready"


async def test_deleting_a_failed_document_drops_its_kept_text(svc):
    doc_id = await _stuck_document(svc, "gone.txt", "encoding")
    await svc.recover_interrupted()
    assert svc.staging.has_text(doc_id)
    assert await svc.delete_document("kb", doc_id)
    assert not svc.staging.has_text(doc_id)

"""The knowledge-base service: ingest documents, search, ask with citations, summarize.

Transactions (the service owns them):

* A document is fully ingested (document row ``ready`` + chunks + memory blocks + index entries,
  one storage write) or absent. While a *new* document is being read its row exists with status
  ``pending`` / ``parsing`` / ``encoding`` (or ``error`` with a message) and no content.
* Re-ingesting a source name whose ``ready`` version has the same content hash is skipped. A
  changed version is read completely first; the old version stays searchable until the write that
  deletes its chunks, blocks and vectors and adds the new ones commits: the replace is atomic, and
  the document keeps its id. Ingestions of one name run one at a time in a process (the later text
  wins); across processes the unique (kb, name) row is shared and the last commit wins.
* Deleting a document removes its rows, blocks and vectors in one write; the chunk search index
  checks the database before every search, so deleted content is never returned or cited. An
  ingestion whose row was deleted while it read writes nothing (checked in its final write, under
  the owner's write lock) and ends ``deleted``. Payload files are compacted once more than half of
  their bytes are dead; files a crashed delete left behind go at the next :meth:`recover_interrupted`.

Model work: with a :class:`~memllm.serving.scheduler.Scheduler` (a server), answers are jobs on
its model thread, decoded in one batch with every other running stream, and ingestion is one of its
exclusive tasks that lets the running streams advance between prefill chunks. Without one, model
work is synchronous and runs in a worker thread under one lock (the model reads one stream at a
time). Database work is async. See memllm/knowledge/README.md for the query modes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fnmatch
import hashlib
import logging
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from memllm.knowledge.chunk_index import ChunkIndex, ChunkIndexCache, ChunkRef
from memllm.knowledge.chunking import TokenMap, chunk_text
from memllm.knowledge.embeddings import Embedder
from memllm.knowledge.encoding import block_chunk_indices, encode_document, engine_layout
from memllm.knowledge.parsing import (
    MAX_BYTES,
    SUPPORTED_SUFFIXES,
    BadDocumentError,
    ParsedDocument,
    parse_file,
)
from memllm.knowledge.sources import FilteredSource
from memllm.knowledge.staging import (
    READING_STATUSES,
    IngestStaging,
    KeyedLocks,
    StagedText,
    interrupted_ids,
    interrupted_message,
)
from memllm.memory.source import split_view_id
from memllm.sampling import SamplingParams
from memllm.serving.jobs import GenerateJob, Text, run_job
from memllm.textstream import TextStream
from memllm_storage import MemoryStore, NotFoundError, Owner
from memllm_storage.models import Document, KnowledgeBase, MemoryBlockRow
from memllm_storage.repositories import ChunkRepository, DocumentRepository, KnowledgeBaseRepository, parse_id
from memllm_storage.store import LayoutMismatchError

if TYPE_CHECKING:
    from memllm.serving.scheduler import Scheduler

log = logging.getLogger(__name__)

QUERY_MODES = ("memory", "rag", "hybrid")
RESTRICT = ("candidates", "documents", "none")
SYSTEM_PROMPT = "You are a helpful assistant. Answer briefly and only from the given documents."


class KnowledgeError(ValueError):
    """A request the knowledge service cannot serve (unknown KB, empty KB, bad argument)."""


class DocumentDeletedError(Exception):
    """The document an ingestion was reading was deleted meanwhile (internal to ingestion)."""


# ----------------------------------------------------------------------------------------- results
@dataclass
class IngestResult:
    source_name: str
    status: str  # ready | skipped | error | deleted (deleted while it was read: nothing written)
    document_id: int | None = None
    replaced_id: int | None = None
    error: str | None = None
    tokens: int = 0
    chunks: int = 0
    blocks: int = 0
    seconds: float = 0.0


@dataclass
class IngestReport:
    results: list[IngestResult] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.results if r.status == "ready")

    def count(self, status: str) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def errors(self) -> list[IngestResult]:
        return [r for r in self.results if r.status == "error"]


@dataclass
class Citation:
    document_id: int
    source_name: str
    chunk_id: int
    chunk_ordinal: int
    char_start: int
    char_end: int
    snippet: str
    score: float

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TraceEntry:
    """A memory block that drew attention while the answer was generated, mapped to its passage.

    ``char_start``/``char_end``/``passage``: the block's span in the document text, placed by
    interpolating its token span inside the chunks it overlaps (exact at chunk boundaries, within a
    few characters elsewhere). ``citation``: the chunk the block overlaps most; ``chunk_ids``: every
    chunk it overlaps.
    """

    block_id: int
    attention: float  # share of the attention mass all memory blocks drew (0..1)
    retrieved: int  # times the block was retrieved (layers x searches)
    document_id: int | None
    source_name: str | None
    token_start: int
    token_end: int
    char_start: int | None
    char_end: int | None
    passage: str
    chunk_ids: list[int]
    citation: Citation | None

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["citation"] = self.citation.as_dict() if self.citation else None
        return d


def _char_at(refs: Sequence[ChunkRef], token: int, end: bool) -> int | None:
    """Interpolated character offset of a token boundary, from the chunks around it."""
    for r in refs:
        if r.token_start <= token <= r.token_end and r.token_end > r.token_start:
            frac = (token - r.token_start) / (r.token_end - r.token_start)
            return r.char_start + round(frac * (r.char_end - r.char_start))
    before = [r for r in refs if r.token_end <= token]
    after = [r for r in refs if r.token_start >= token]
    if end and before:
        return max(r.char_end for r in before)
    if after:
        return min(r.char_start for r in after)
    return max((r.char_end for r in before), default=None)


def block_passage(
    refs: Sequence[ChunkRef], token_start: int, token_end: int
) -> tuple[int | None, int | None, str, list[int]]:
    """(char_start, char_end, text, overlapping chunk ids) of a block of one document."""
    over = [r for r in refs if min(r.token_end, token_end) > max(r.token_start, token_start)]
    a, b = _char_at(refs, token_start, False), _char_at(refs, token_end, True)
    if a is None or b is None or b <= a:
        return a, b, "", [r.chunk_id for r in over]
    pieces, end = [], a
    for r in sorted(over, key=lambda r: r.char_start):
        lo, hi = max(end, r.char_start, a), min(r.char_end, b)
        if hi > lo:
            pieces.append(r.text[lo - r.char_start : hi - r.char_start])
            end = hi
    return a, b, " ".join(p.strip() for p in pieces), [r.chunk_id for r in over]


@dataclass
class Answer:
    text: str
    mode: str
    citations: list[Citation]
    trace: list[TraceEntry]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "mode": self.mode,
            "citations": [c.as_dict() for c in self.citations],
            "memory_trace": [t.as_dict() for t in self.trace],
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens},
            "finish_reason": self.finish_reason,
        }


@dataclass
class SummaryPart:
    char_start: int
    char_end: int
    text: str
    passages: list[Citation]


@dataclass
class Summary:
    document_id: int
    source_name: str
    text: str
    parts: list[SummaryPart]

    def as_dict(self) -> dict[str, Any]:
        return {
            "document_id": self.document_id,
            "source_name": self.source_name,
            "text": self.text,
            "parts": [
                {
                    "char_start": p.char_start,
                    "char_end": p.char_end,
                    "text": p.text,
                    "passages": [c.as_dict() for c in p.passages],
                }
                for p in self.parts
            ],
        }


@dataclass
class KBInfo:
    id: int
    name: str
    description: str
    documents: int
    ready: int
    blocks: int
    tokens: int


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def make_snippet(text: str, query: str | None = None, limit: int = 240) -> str:
    """The chunk's sentence that shares the most terms with ``query`` (or its start), at most ``limit`` chars."""
    best = (0, 0)
    if query:
        from memllm.knowledge.analysis import analyze
        from memllm.knowledge.chunking import sentence_spans

        terms = set(analyze(query))
        for a, _ in sentence_spans(text):
            hits = len(terms & set(analyze(text[a : a + limit])))
            if hits > best[0]:
                best = (hits, a)
    start = best[1]
    piece = text[start:]
    out = piece if len(piece) <= limit else piece[: limit - 1].rstrip() + "…"
    return ("…" + out) if start > 0 else out


def citation_of(ref: ChunkRef, score: float, query: str | None = None) -> Citation:
    return Citation(
        ref.document_id,
        ref.source_name,
        ref.chunk_id,
        ref.ordinal,
        ref.char_start,
        ref.char_end,
        make_snippet(ref.text, query),
        float(score),
    )


ProgressFn = Callable[[str, dict[str, Any]], None]  # (event, info); events: start, tokens, status, done


# ----------------------------------------------------------------------------------------- service
class KnowledgeService:
    """See module docstring. ``engine`` may be None for search-only use (no ingestion or answers)."""

    def __init__(
        self,
        store: MemoryStore,
        engine,
        embedder: Embedder | None = None,
        *,
        chunk_tokens: int = 200,
        overlap_tokens: int = 32,
        max_bytes: int = MAX_BYTES,
        model_name: str | None = None,
        scheduler: Scheduler | None = None,
    ) -> None:
        """``scheduler``: run the model work through it (see the module docstring)."""
        self.store = store
        self.engine = engine
        self.scheduler = scheduler
        self.embedder = embedder or Embedder()
        self.chunk_tokens = chunk_tokens
        self.overlap_tokens = overlap_tokens
        self.max_bytes = max_bytes
        self.model_name = model_name or (engine.loaded.name if engine is not None else None)
        self.chunks = ChunkIndexCache(store.data_dir, self.embedder)
        self.staging = IngestStaging(store.data_dir / "ingest")
        self._model_lock = threading.Lock()
        self._name_locks = KeyedLocks()  # one ingestion per (kb id, document name) at a time

    # ----------------------------------------------------------------------------- construction
    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, settings, engine=None, embedder: Embedder | None = None, **kwargs: Any
    ) -> AsyncIterator[KnowledgeService]:
        store = await MemoryStore.from_settings(settings)
        try:
            yield cls(store, engine, embedder, **kwargs)
        finally:
            await store.close()

    def _need_engine(self):
        if self.engine is None:
            raise KnowledgeError("this knowledge service has no model loaded")
        return self.engine

    async def _run_model(self, fn: Callable, *args: Any) -> Any:
        """Model work, alone: a scheduler task, or under the model lock in a worker thread."""
        if self.scheduler is not None:
            return await self.scheduler.run(fn, *args)

        def locked():
            with self._model_lock:
                return fn(*args)

        return await asyncio.to_thread(locked)

    def _between_chunks(self, progress: Callable[[int], None]) -> Callable[[int], None]:
        """A prefill progress callback that also lets the scheduler's running streams advance."""
        if self.scheduler is None:
            return progress
        scheduler = self.scheduler

        def step(n: int) -> None:
            progress(n)
            scheduler.checkpoint()

        return step

    async def _generate(
        self, state, ids: Sequence[int], params: SamplingParams, stream: TextStream | None = None, on_text=None
    ) -> GenerateJob:
        """Read ``ids`` into ``state`` and generate (the engine's plain job): batched with the other
        streams on the scheduler, or alone in the worker thread. ``on_text(piece)`` receives the
        text of ``stream`` as it comes. Returns the finished job."""
        engine = self._need_engine()
        job = engine.generation_job(params, ids, stream)

        def deliver(event) -> None:
            if on_text is not None and isinstance(event, Text):
                on_text(event.text)

        if self.scheduler is None:

            def work() -> None:
                for event in run_job(engine, state, job, ids):
                    deliver(event)

            await self._run_model(work)
        else:
            async with self.scheduler.submit(job, state, ids) as handle:  # leaving early cancels the job
                async for event in handle:
                    deliver(event)
        return job

    # ------------------------------------------------------------------------- knowledge bases
    async def create_kb(
        self, name: str, description: str = "", *, exist_ok: bool = False, tenant_id: int | None = None
    ) -> KnowledgeBase:
        """A new knowledge base; names are unique per tenant (``tenant_id`` None: the local tenant)."""
        name = name.strip()
        if not name:
            raise KnowledgeError("a knowledge base needs a name")
        async with self.store.sessions() as s:
            repo = KnowledgeBaseRepository(s)
            existing = await repo.get_by_name(name, tenant_id)
            if existing is not None:
                if exist_ok:
                    return existing
                raise KnowledgeError(f"knowledge base {name!r} already exists")
            kb = await repo.create(name, tenant_id=tenant_id, description=description)
            await s.commit()
            return kb

    async def get_kb(self, name_or_id: str | int) -> KnowledgeBase:
        """By id (an int) or by name, then id (a string, as typed on the command line)."""
        async with self.store.sessions() as s:
            if isinstance(name_or_id, int):
                kb = await s.get(KnowledgeBase, name_or_id)
                if kb is None:
                    raise NotFoundError(f"knowledge base {name_or_id} not found")
                return kb
            repo = KnowledgeBaseRepository(s)
            kb = await repo.get_by_name(str(name_or_id))
            if kb is None and (kb_id := parse_id(str(name_or_id))) is not None:
                kb = await s.get(KnowledgeBase, kb_id)
            if kb is None:
                raise NotFoundError(f"knowledge base {name_or_id!r} not found")
            return kb

    async def list_kbs(self, tenant_id: int | None = None, kb_ids: Sequence[int] | None = None) -> list[KBInfo]:
        """The tenant's knowledge bases (``tenant_id`` None: the local tenant), or only ``kb_ids``."""
        async with self.store.sessions() as s:
            kbs = await KnowledgeBaseRepository(s).list(tenant_id)
            if kb_ids is not None:
                kbs = [kb for kb in kbs if kb.id in set(kb_ids)]
            out = []
            for kb in kbs:
                docs = (
                    await s.execute(
                        select(func.count(Document.id), func.coalesce(func.sum(Document.token_count), 0)).where(
                            Document.knowledge_base_id == kb.id, Document.status == "ready"
                        )
                    )
                ).one()
                total = (
                    await s.execute(select(func.count(Document.id)).where(Document.knowledge_base_id == kb.id))
                ).scalar_one()
                blocks = (
                    await s.execute(
                        select(func.count(MemoryBlockRow.id)).where(MemoryBlockRow.knowledge_base_id == kb.id)
                    )
                ).scalar_one()
                out.append(KBInfo(kb.id, kb.name, kb.description, int(total), int(docs[0]), int(blocks), int(docs[1])))
            return out

    async def delete_kb(self, name_or_id: str | int) -> bool:
        try:
            kb = await self.get_kb(name_or_id)
        except NotFoundError:
            return False
        gone = await self.store.delete_owner(Owner.kb(kb.id))
        self.chunks.delete_cache(kb.id)
        return gone

    async def list_documents(self, kb: str | int, status: str | None = None) -> list[Document]:
        kb_row = await self.get_kb(kb)
        async with self.store.sessions() as s:
            return list(await DocumentRepository(s).list(kb_row.id, status=status))

    async def get_document(self, kb: str | int, doc: int | str) -> Document:
        kb_row = await self.get_kb(kb)
        async with self.store.sessions() as s:
            repo = DocumentRepository(s)
            doc_id = parse_id(str(doc))
            row = await s.get(Document, doc_id) if doc_id is not None else None
            if row is None or row.knowledge_base_id != kb_row.id:
                row = await repo.get_by_source(kb_row.id, str(doc))
            if row is None:
                raise NotFoundError(f"document {doc!r} not found in knowledge base {kb_row.name!r}")
            return row

    async def document_text(self, kb: str | int, doc: int | str) -> str:
        """The document's text, reassembled from its chunks (exact at every chunk's char span)."""
        row = await self.get_document(kb, doc)
        async with self.store.sessions() as s:
            chunks = await ChunkRepository(s).list(row.id)
        buf = [" "] * (max((c.char_end for c in chunks), default=0))
        for c in chunks:
            buf[c.char_start : c.char_end] = c.text
        return "".join(buf)

    async def delete_document(self, kb: str | int, doc: int | str) -> bool:
        """Forget a document everywhere: rows, chunks, blocks, vectors (one write). An ingestion
        still reading it ends ``deleted`` without writing it back. When more than half of the
        knowledge base's payload bytes are then dead, they are compacted away."""
        try:
            row = await self.get_document(kb, doc)
        except NotFoundError:
            return False
        owner = Owner.kb(row.knowledge_base_id)
        async with self.store.writer(owner, self._layout_or_none()) as w:
            ok = await w.delete_document(row.id)
        if ok and not self.staging.is_being_read(row.id):
            self.staging.drop(row.id)  # else the reader drops it when it sees the row gone
        if ok:
            await self._compact_if_wasteful(owner)
        return ok

    async def _compact_if_wasteful(self, owner: Owner) -> None:
        """Give deleted blocks' payload bytes back (best effort: the next delete tries again)."""
        try:
            await self.store.compact_if_wasteful(owner)
        except Exception:
            log.exception("%s: compaction after a delete failed", owner)

    def _layout_or_none(self):
        return engine_layout(self.engine) if self.engine is not None else None

    # ------------------------------------------------------------------------------ ingestion
    async def ingest_text(
        self,
        kb: str | int,
        source_name: str,
        text: str,
        *,
        meta: dict[str, Any] | None = None,
        media_type: str = "text/plain",
        progress: ProgressFn | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> IngestResult:
        """Ingest one document from text (already parsed). Never raises for a bad document: the
        result says ``error`` with the message; raises only for a missing KB or interruption.

        Ingestions of one name run one after the other in this process: a later one waits (its
        progress hears ``queued``), then replaces what the earlier one wrote, so the newer text
        wins. A document deleted while it is read is not written back: the result says ``deleted``.
        """
        kb_row = await self.get_kb(kb)
        emit = progress or (lambda event, info: None)
        key = (kb_row.id, source_name)
        if self._name_locks.busy(key):
            await self._announce_queued(kb_row.id, source_name, emit)
        async with self._name_locks.hold(key):
            return await self._ingest_one(kb_row.id, source_name, text, meta, media_type, emit, should_stop)

    async def _announce_queued(self, kb_id: int, source_name: str, emit: ProgressFn) -> None:
        """Tell a waiting ingestion's caller the row it will fill (the earlier ingestion's), if any yet."""
        async with self.store.sessions() as s:
            row = await DocumentRepository(s).get_by_source(kb_id, source_name)
        if row is not None:
            emit("status", {"source": source_name, "status": "queued", "document_id": row.id})

    async def _ingest_one(
        self,
        kb_id: int,
        source_name: str,
        text: str,
        meta: dict[str, Any] | None,
        media_type: str,
        emit: ProgressFn,
        should_stop: Callable[[], bool] | None,
    ) -> IngestResult:
        """:meth:`ingest_text` with the name's lock held."""
        t0 = time.perf_counter()
        from memllm.knowledge.parsing import clean_text

        text = clean_text(text)
        result = IngestResult(source_name, "error")
        pending_id = target_id = None
        reading = contextlib.ExitStack()
        try:
            if not text:
                raise BadDocumentError(f"{source_name}: no text")
            sha = sha256_text(text)
            async with self.store.sessions() as s:
                existing = await DocumentRepository(s).get_by_source(kb_id, source_name)
            if existing is not None and existing.status == "ready" and existing.sha256 == sha:
                result.status, result.document_id = "skipped", existing.id
                result.tokens = existing.token_count
                emit("status", {"source": source_name, "status": "skipped"})
                return result
            if existing is not None and existing.status == "ready":
                target_id = existing.id  # a replacement: the old version answers until the swap
            else:  # a new document gets a visible row with its status
                target_id, ours = await self._claim_row(kb_id, source_name, sha, media_type, meta, existing)
                if ours:  # its text is kept on disk until it is ready, and a lock says it is being read
                    pending_id = target_id
                    self.staging.stage(pending_id, StagedText(source_name, text, media_type, meta or {}))
                    reading.enter_context(self.staging.reading(pending_id))
            result.document_id = target_id

            async def set_status(status: str) -> None:
                emit("status", {"source": source_name, "status": status, "error": None, "document_id": target_id})
                if pending_id is not None:
                    await self._set_reading_status(pending_id, status)

            await set_status("parsing")
            engine = self._need_engine()
            ids, tmap = TokenMap.from_tokenizer(engine.tokenizer, text)
            if not ids:
                raise BadDocumentError(f"{source_name}: no tokens")
            chunks = chunk_text(text, tmap, self.chunk_tokens, self.overlap_tokens)
            await set_status("encoding")
            emit("start", {"source": source_name, "tokens": len(ids)})
            # the chunk embeddings are computed while the model reads (a pipeline: neither waits)
            embedding = asyncio.ensure_future(asyncio.to_thread(self.embedder.encode, [c.text for c in chunks]))
            try:
                blocks = await self._run_model(
                    encode_document,
                    engine,
                    ids,
                    self._between_chunks(lambda n: emit("tokens", {"source": source_name, "n": n})),
                    should_stop,
                )
            except BaseException:
                await asyncio.gather(embedding, return_exceptions=True)  # never leave the embedder running
                raise
            vecs = await embedding
            owner_map = block_chunk_indices(blocks, [(c.token_start, c.token_end) for c in chunks])
            fields = dict(
                sha256=sha, media_type=media_type, meta=meta or {}, token_count=len(ids), char_count=len(text)
            )
            async with self.store.writer(Owner.kb(kb_id), engine_layout(engine), model=self.model_name) as w:
                # one atomic swap under the owner's write lock: the row keeps its id and gets the new
                # content, or it was deleted meanwhile and nothing is written
                doc = await w.refill_document(target_id, status="ready", error=None, **fields)
                if doc is None:
                    raise DocumentDeletedError(target_id)
                rows = await w.chunks.add_many(doc.id, [c.as_row() for c in chunks])
                chunk_ids = [rows[i].id if i is not None else None for i in owner_map]
                await w.add_blocks(blocks, document_id=doc.id, chunk_ids=chunk_ids)
            await asyncio.to_thread(self.chunks.store_embeddings, kb_id, [r.id for r in rows], vecs)
            result.status, result.document_id = "ready", doc.id
            result.replaced_id = existing.id if existing is not None and existing.status == "ready" else None
            result.tokens, result.chunks, result.blocks = len(ids), len(chunks), len(blocks)
            if pending_id is not None:
                self.staging.drop(pending_id)
            emit("status", {"source": source_name, "status": "ready", "document_id": doc.id})
        except DocumentDeletedError:
            self._ended_deleted(result, emit)
            if pending_id is not None:
                self.staging.drop(pending_id)
        except (BadDocumentError, LayoutMismatchError) as exc:  # reading it again would not help
            result.error = str(exc) if isinstance(exc, BadDocumentError) else f"{source_name}: {exc}"
            await self._mark_error(result, kb_id, source_name, result.error, emit, target_id)
            if pending_id is not None:
                self.staging.drop(pending_id)
        except InterruptedError:
            raise
        except Exception as exc:  # a fault of ours or of the machine: recorded, the text kept for a retry
            log.exception("ingest %s failed", source_name)
            result.error = f"{source_name}: ingestion failed ({type(exc).__name__}: {exc}); retry it"
            await self._mark_error(result, kb_id, source_name, result.error, emit, target_id)
            if pending_id is not None and result.status == "deleted":
                self.staging.drop(pending_id)
        finally:
            reading.close()
            result.seconds = time.perf_counter() - t0
        return result

    async def _set_reading_status(self, doc_id: int, status: str) -> None:
        """Move a document being read to ``status``; :class:`DocumentDeletedError` when it is gone."""
        async with self.store.sessions() as s:
            try:
                await DocumentRepository(s).set_status(doc_id, status, None)
            except NotFoundError:
                raise DocumentDeletedError(doc_id) from None
            await s.commit()

    @staticmethod
    def _ended_deleted(result: IngestResult, emit: ProgressFn) -> None:
        """Record that the document was deleted while it was read (nothing of it was written)."""
        result.status = "deleted"
        result.error = f"{result.source_name}: deleted while it was being read; not ingested"
        result.tokens = result.chunks = result.blocks = 0
        log.info("ingest %s: %s", result.source_name, result.error)
        emit("status", {"source": result.source_name, "status": "deleted", "document_id": result.document_id})

    async def recover_interrupted(self, kb: str | int | None = None) -> list[int]:
        """Mark ``error`` every document (of ``kb``, or of all) left in a reading status by a process
        that died; returns their ids. Their text, when kept, waits for :meth:`staged_for_retry`."""
        kb_id = (await self.get_kb(kb)).id if kb is not None else None
        async with self.store.sessions() as s:
            query = select(Document.id, Document.status).where(Document.status.in_(READING_STATUSES))
            if kb_id is not None:
                query = query.where(Document.knowledge_base_id == kb_id)
            ids = interrupted_ids(self.staging, [(r.id, r.status) for r in (await s.execute(query)).all()])
            repo = DocumentRepository(s)
            for doc_id in ids:
                await repo.set_status(doc_id, "error", interrupted_message(self.staging.has_text(doc_id)))
            await s.commit()
        for doc_id in ids:
            log.warning("document %d: its ingestion was interrupted; marked error", doc_id)
        if kb is None:
            await self.remove_orphans()
        return ids

    async def remove_orphans(self) -> None:
        """Files a delete left behind when its process died between the commit and the cleanup:
        kept texts of deleted documents, directories of deleted knowledge bases and sessions."""
        staged = sorted(self.staging.staged_ids())
        async with self.store.sessions() as s:
            live = set((await s.execute(select(Document.id).where(Document.id.in_(staged)))).scalars())
        for doc_id in self.staging.drop_orphans(live):
            log.warning("document %d: removed the kept text of a deleted document", doc_id)
        await self.store.remove_orphan_directories()

    def retryable(self, row: Document) -> bool:
        """Whether a failed document's text was kept, so that it can be read again."""
        return row.status == "error" and self.staging.has_text(row.id)

    async def staged_for_retry(self, kb: str | int, doc: int | str) -> StagedText:
        """The kept text of a failed (or interrupted) document, to ingest again under its name."""
        row = await self.get_document(kb, doc)
        if row.status in READING_STATUSES and row.id in await self.recover_interrupted(kb):
            row = await self.get_document(kb, row.id)
        if row.status != "error":
            raise KnowledgeError(f"document {row.id} is {row.status}: only a failed ingestion can be retried")
        staged = self.staging.load(row.id)
        if staged is None:
            raise KnowledgeError(f"document {row.id}: its text was not kept; upload it again")
        return staged

    async def _claim_row(
        self, kb_id: int, source_name: str, sha: str, media_type: str, meta: dict[str, Any] | None, existing
    ) -> tuple[int, bool]:
        """The row a new (or failed) document is read into, set ``pending``: (id, ours).

        Two processes creating one name race on the unique (kb, name) constraint: the loser gets the
        winner's row (``ours`` False: it neither stages the text nor moves the status) and fills it
        when it commits, so the last commit wins and nobody fails."""
        for _ in range(3):
            try:
                return await self._pending_row(kb_id, source_name, sha, media_type, meta, existing), True
            except NotFoundError:  # the failed row we meant to reuse was deleted meanwhile
                existing = None
                continue
            except IntegrityError:  # another process created the name meanwhile
                pass
            async with self.store.sessions() as s:
                row = await DocumentRepository(s).get_by_source(kb_id, source_name)
            if row is not None:
                return row.id, False
            existing = None
        raise KnowledgeError(f"{source_name}: the document changed under this upload three times; upload it again")

    async def _pending_row(self, kb_id, source_name, sha, media_type, meta, existing) -> int:
        async with self.store.sessions() as s:
            repo = DocumentRepository(s)
            if existing is not None:  # an earlier error or an interrupted run: start it again
                doc = await repo.set_status(
                    existing.id, "pending", None, sha256=sha, media_type=media_type, meta=meta or {}
                )
            else:
                doc = await repo.create(
                    kb_id, source_name, sha256=sha, media_type=media_type, meta=meta, status="pending"
                )
            await s.commit()
            return doc.id

    async def _mark_error(
        self,
        result: IngestResult,
        kb_id: int,
        source_name: str,
        message: str,
        emit: ProgressFn,
        target_id: int | None = None,
    ) -> None:
        """Record a failed document: a new one keeps a row with status error; a ready old version is
        kept. ``target_id``: the row the ingestion was filling; when it is gone, the document was
        deleted meanwhile and no row is made again (the result says ``deleted``)."""
        async with self.store.sessions() as s:
            repo = DocumentRepository(s)
            if target_id is not None:
                doc = await s.get(Document, target_id)
                if doc is None:
                    self._ended_deleted(result, emit)
                    return
            else:
                doc = await repo.get_by_source(kb_id, source_name)
            log.warning("ingest %s: %s", source_name, message)
            emit("status", {"source": source_name, "status": "error", "error": message})
            if doc is None:
                doc = await repo.create(kb_id, source_name, sha256="", status="error")
            if doc.status != "ready":
                await repo.set_status(doc.id, "error", message)
                result.document_id = doc.id
            await s.commit()

    async def ingest_texts(
        self,
        kb: str | int,
        items: Iterable[tuple[str, str, dict[str, Any]]],
        *,
        progress: bool | ProgressFn = False,
    ) -> IngestReport:
        """Ingest (source name, text, metadata) items, one document each."""
        items = list(items)
        report = IngestReport()
        t0 = time.perf_counter()
        with _progress_bars(progress, len(items), sum(len(t) // 4 for _, t, _ in items)) as emit:
            for name, text, meta in items:
                report.results.append(await self.ingest_text(kb, name, text, meta=meta, progress=emit))
                emit("done", {"result": report.results[-1]})
        report.seconds = time.perf_counter() - t0
        return report

    async def ingest_paths(
        self,
        kb: str | int,
        paths: Sequence[Path | str],
        *,
        include: Sequence[str] = (),
        exclude: Sequence[str] = (),
        recursive: bool = True,
        text_field: str | None = None,
        progress: bool | ProgressFn = False,
        should_stop: Callable[[], bool] | None = None,
    ) -> IngestReport:
        """Ingest files and directories. Documents already ingested with the same content are
        skipped, so re-running an interrupted ingestion resumes where it stopped. Bad files are
        reported (status error) and skipped."""
        files = collect_files(paths, include, exclude, recursive)
        report = IngestReport()
        t0 = time.perf_counter()
        sizes = []
        for _, f in files:
            try:
                sizes.append(f.stat().st_size)
            except OSError:
                sizes.append(0)
        with _progress_bars(progress, len(files), sum(sizes) // 4) as emit:
            for name, path in files:
                try:
                    docs = await asyncio.to_thread(parse_file, path, max_bytes=self.max_bytes, text_field=text_field)
                except BadDocumentError as exc:
                    res = IngestResult(name, "error", error=str(exc))
                    kb_row = await self.get_kb(kb)
                    await self._mark_error(res, kb_row.id, name, str(exc), emit)
                    report.results.append(res)
                    emit("done", {"result": res})
                    continue
                for i, doc in enumerate(docs):
                    source = name if len(docs) == 1 else f"{name}#{doc.meta.get('record', i)}"
                    res = await self._ingest_parsed(kb, source, doc, emit, should_stop)
                    report.results.append(res)
                emit("done", {"result": report.results[-1]})
        report.seconds = time.perf_counter() - t0
        return report

    async def _ingest_parsed(self, kb, source: str, doc: ParsedDocument, emit, should_stop) -> IngestResult:
        return await self.ingest_text(
            kb, source, doc.text, meta=doc.meta, media_type=doc.media_type, progress=emit, should_stop=should_stop
        )

    # ------------------------------------------------------------------------------- search
    async def _index(self, kb_id: int) -> ChunkIndex:
        async with self.store.sessions() as s:
            return await self.chunks.get(s, kb_id)

    async def search(
        self,
        kb: str | int,
        query: str,
        k: int = 8,
        method: str = "hybrid",
        *,
        documents: Sequence[int] | None = None,
    ) -> list[Citation]:
        """Ranked chunks with scores (no generation). ``documents`` restricts to those document ids."""
        if not query.strip():
            raise KnowledgeError("the query is empty")
        kb_row = await self.get_kb(kb)
        index = await self._index(kb_row.id)
        if len(index) == 0:
            return []
        qvec = await asyncio.to_thread(self.embedder.encode_query, query) if method != "bm25" else None
        allowed = np.isin(index.doc_ids, list(documents)) if documents is not None else None
        ranked = index.hybrid.rank(query, qvec, k, method, allowed=allowed)
        return [citation_of(index.refs[r.index], r.score, query) for r in ranked]

    # --------------------------------------------------------------------------------- memory
    async def memory_source(self, kb_id: int):
        """The knowledge base's memory blocks as a source for attention (None before any is stored)."""
        return await self._memory_source(kb_id)

    async def _memory_source(self, kb_id: int):
        try:
            src = await self.store.open_source(Owner.kb(kb_id))
        except LayoutMismatchError:
            return None  # no memory yet
        await src.refresh()
        if src.num_blocks() == 0:
            return None
        layout = engine_layout(self._need_engine())
        if src.layout != layout:
            raise KnowledgeError(
                f"knowledge base memory was written with layout {src.layout}, the model now uses {layout}: "
                "re-ingest it or restore the memory settings"
            )
        return src

    @staticmethod
    def _allowed_blocks(
        src, index: ChunkIndex, candidates: Sequence[ChunkRef] | None, restrict: str
    ) -> np.ndarray | None:
        """Block ids memory may retrieve (None = all)."""
        if restrict == "none" or candidates is None:
            return None
        ids = src.block_ids()
        infos = src.block_info(ids)
        if restrict == "documents":
            docs = {c.document_id for c in candidates}
            keep = [b for b, e in zip(ids.tolist(), infos, strict=True) if e is not None and e.document_id in docs]
        else:
            spans = defaultdict(list)
            for c in candidates:
                spans[c.document_id].append((c.token_start, c.token_end))
            keep = [
                b
                for b, e in zip(ids.tolist(), infos, strict=True)
                if e is not None
                and any(min(te, e.token_end) > max(ts, e.token_start) for ts, te in spans.get(e.document_id, ()))
            ]
        return np.array(keep, np.int64)

    def _trace_entries(self, state, src, index: ChunkIndex, source_pos: int, n: int) -> list[TraceEntry]:
        """Top memory blocks by attention mass, mapped to documents and chunks (only blocks of the KB)."""
        if state.trace is None:
            return []
        mass: dict[int, float] = {}
        retrieved: dict[int, int] = {}
        for vid, m in state.trace.mass.items():
            s_idx, bid = split_view_id(vid)
            if s_idx == source_pos:
                mass[bid] = mass.get(bid, 0.0) + m
                retrieved[bid] = retrieved.get(bid, 0) + state.trace.retrieved.get(vid, 0)
        total = sum(mass.values()) or 1.0
        best = sorted(mass.items(), key=lambda kv: -kv[1])[:n]
        infos = src.block_info(np.array([b for b, _ in best], np.int64)) if best else []
        doc_refs: dict[int, list[ChunkRef]] = {}
        out = []
        for (bid, m), info in zip(best, infos, strict=True):
            if info is None:
                continue  # deleted since (cannot happen within one locked call, kept for safety)
            refs = doc_refs.setdefault(info.document_id, index.chunks_of(info.document_id)) if info.document_id else []
            a, b, passage, chunk_ids = block_passage(refs, info.token_start, info.token_end)
            cit = None
            if info.chunk_id is not None and info.chunk_id in index.by_id:
                cit = citation_of(index.refs[index.by_id[info.chunk_id]], m / total)
            out.append(
                TraceEntry(
                    bid,
                    m / total,
                    retrieved.get(bid, 0),
                    info.document_id,
                    cit.source_name if cit else None,
                    info.token_start,
                    info.token_end,
                    a,
                    b,
                    passage,
                    chunk_ids,
                    cit,
                )
            )
        return out

    def _memory_state(self, src, allowed: np.ndarray | None, trace: bool = True, **overrides):
        engine = self._need_engine()
        if src is None:
            return engine.new_state(mode="memory", trace=trace, **overrides), 1
        source = src if allowed is None else FilteredSource(src, allowed)
        return engine.new_state(mode="memory", extra_sources=[source], trace=trace, **overrides), 1

    async def memory_rank(self, kb: str | int, query: str, k: int = 100) -> list[tuple[str, float]]:
        """Documents ranked by the attention their memory blocks drew while the model read ``query``
        (kNN retrieval in every memory layer): [(source name, score)], best first."""
        kb_row = await self.get_kb(kb)
        src = await self._memory_source(kb_row.id)
        if src is None:
            return []
        engine = self._need_engine()
        ids = engine.encode(query)

        def work():
            state, pos = self._memory_state(src, None)
            engine.prefill(state, ids)
            per_doc: dict[int, float] = defaultdict(float)
            entries = {}
            for vid, m in state.trace.mass.items():
                s_idx, bid = split_view_id(vid)
                if s_idx == pos:
                    entries[bid] = m
            infos = src.block_info(np.array(list(entries), np.int64)) if entries else []
            for m, info in zip(entries.values(), infos, strict=True):
                if info is not None and info.document_id is not None:
                    per_doc[info.document_id] += m
            return per_doc

        per_doc = await self._run_model(work)
        async with self.store.sessions() as s:
            names = (
                dict(
                    (
                        await s.execute(select(Document.id, Document.source_name).where(Document.id.in_(list(per_doc))))
                    ).all()
                )
                if per_doc
                else {}
            )
        ranked = sorted(per_doc.items(), key=lambda kv: -kv[1])[:k]
        return [(names[d], float(m)) for d, m in ranked if d in names]

    # ------------------------------------------------------------------------------------ ask
    async def ask(
        self,
        kb: str | int,
        question: str,
        *,
        mode: str = "hybrid",
        k: int = 4,
        candidates_k: int = 16,
        restrict: str = "candidates",
        max_tokens: int = 128,
        temperature: float = 0.0,
        system: str | None = SYSTEM_PROMPT,
        instruction: str | None = None,
        trace_blocks: int = 8,
        on_text: Callable[[str], None] | None = None,
        documents: Sequence[int] | None = None,
        logit_bias: tuple[tuple[int, float], ...] = (),
    ) -> Answer:
        """Answer ``question`` from the knowledge base.

        mode ``rag``: the ``k`` best chunks (hybrid search) go into the prompt; no memory.
        mode ``memory``: the prompt is only the question; every memory layer retrieves the KB's
        blocks by kNN (restricted to the blocks overlapping the ``candidates_k`` best chunks with
        ``restrict="candidates"``, to their documents with ``"documents"``, or all with ``"none"``).
        mode ``hybrid``: both. Citations: the prompt's chunks (rag, hybrid) or the chunks of the
        blocks that drew the most attention (memory); the memory trace lists those blocks.
        ``logit_bias``: (token id, offset) pairs, as :class:`~memllm.sampling.SamplingParams` takes them.
        """
        if mode not in QUERY_MODES:
            raise KnowledgeError(f"unknown mode {mode!r}; choose one of {QUERY_MODES}")
        if restrict not in RESTRICT:
            raise KnowledgeError(f"unknown restriction {restrict!r}; choose one of {RESTRICT}")
        if not question.strip():
            raise KnowledgeError("the question is empty")
        engine = self._need_engine()
        kb_row = await self.get_kb(kb)
        index = await self._index(kb_row.id)
        if len(index) == 0:
            raise KnowledgeError(f"knowledge base {kb_row.name!r} has no ready documents")
        qvec = await asyncio.to_thread(self.embedder.encode_query, question)
        allowed_docs = np.isin(index.doc_ids, list(documents)) if documents is not None else None
        ranked = index.hybrid.rank(question, qvec, max(k, candidates_k), "hybrid", allowed=allowed_docs)
        candidates = [index.refs[r.index] for r in ranked]
        prompt_refs = [(index.refs[r.index], r.score) for r in ranked[:k]] if mode != "memory" else []
        src = await self._memory_source(kb_row.id) if mode != "rag" else None
        if mode != "rag" and src is None:
            raise KnowledgeError(f"knowledge base {kb_row.name!r} has no memory blocks")

        content = _question_prompt(question, [r for r, _ in prompt_refs], instruction)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        ids = engine.chat_ids(messages)
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature, logit_bias=logit_bias)

        def new_state():
            if mode == "rag":
                return engine.new_state(mode="window"), 1
            restrict_to = restrict if documents is None or restrict != "none" else "documents"
            pool = (
                candidates
                if restrict_to == "candidates"
                else (candidates if documents is None else [r for r in index.refs if r.document_id in set(documents)])
            )
            allowed = self._allowed_blocks(src, index, pool, restrict_to)
            return self._memory_state(src, allowed)

        state, pos = await asyncio.to_thread(new_state)
        stream = TextStream(engine.tokenizer, ())
        job = await self._generate(state, ids, params, stream, on_text)
        trace = self._trace_entries(state, src, index, pos, trace_blocks) if src is not None else []
        text, n_out, finish = stream.text.strip(), len(job.generated), job.finish_reason
        if mode == "memory":
            citations = _citations_from_trace(trace, index)
        else:
            citations = [citation_of(r, s, question) for r, s in prompt_refs]
        return Answer(text, mode, citations, trace, len(ids), n_out, finish)

    # ------------------------------------------------------------------------------ summarize
    async def summarize(
        self,
        kb: str | int,
        doc: int | str,
        *,
        section_tokens: int = 1024,
        max_tokens: int = 120,
        passages: int = 3,
    ) -> Summary:
        """Summarize a document of any length: each section is read in the window while memory
        holds the rest of the document (its blocks), then the section summaries are combined
        (map-reduce). Each part carries the passages it drew on (the chunks whose blocks drew the
        most attention, plus the section's own span)."""
        engine = self._need_engine()
        row = await self.get_document(kb, doc)
        if row.status != "ready":
            raise KnowledgeError(f"document {row.source_name!r} is not ready (status {row.status})")
        index = await self._index(row.knowledge_base_id)
        refs = index.chunks_of(row.id)
        src = await self._memory_source(row.knowledge_base_id)
        sections = _sections(refs, section_tokens)
        doc_blocks = self._allowed_blocks(src, index, refs, "documents") if src is not None else None
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, repetition_penalty=1.1)
        parts: list[SummaryPart] = []
        for sec in sections:
            text = _join_chunks(sec)
            content = (
                f'Summarize the following part of the document "{row.source_name}" in two or three sentences.\n\n{text}'
            )
            out, trace = await self._generate_with_memory(engine, src, index, doc_blocks, content, params, passages)
            cites = _citations_from_trace(trace, index) or [citation_of(sec[0], 1.0)]
            parts.append(SummaryPart(sec[0].char_start, sec[-1].char_end, out, cites))
        if len(parts) == 1:
            return Summary(row.id, row.source_name, parts[0].text, parts)
        texts = [p.text for p in parts]
        while len(texts) > 1:  # reduce in groups that fit the window
            groups, cur, cur_len = [], [], 0
            for t in texts:
                n = len(engine.encode(t))
                if cur and cur_len + n > 1500:
                    groups.append(cur)
                    cur, cur_len = [], 0
                cur.append(t)
                cur_len += n
            groups.append(cur)
            new = []
            for g in groups:
                content = (
                    "Combine these section summaries into one short summary of the whole document.\n\n"
                    + "\n\n".join(f"Section {i + 1}: {t}" for i, t in enumerate(g))
                )
                out, _ = await self._generate_with_memory(engine, src, index, doc_blocks, content, params, 0)
                new.append(out)
            if len(new) == len(texts):  # cannot shrink further
                texts = ["\n".join(new)]
                break
            texts = new
        return Summary(row.id, row.source_name, texts[0], parts)

    async def _generate_with_memory(self, engine, src, index, allowed, content, params, n_trace):
        ids = engine.chat_ids([{"role": "user", "content": content}])
        state, pos = self._memory_state(src, allowed) if src is not None else (engine.new_state(mode="window"), 1)
        job = await self._generate(state, ids, params)
        trace = self._trace_entries(state, src, index, pos, n_trace) if (src is not None and n_trace) else []
        return engine.tokenizer.decode(job.generated, skip_special_tokens=True).strip(), trace


# ----------------------------------------------------------------------------------------- helpers
def _question_prompt(question: str, refs: Sequence[ChunkRef], instruction: str | None) -> str:
    parts = []
    if refs:
        parts.append("Passages:")
        parts.extend(f"[{i + 1}] {r.text}" for i, r in enumerate(refs))
        parts.append("")
    if instruction:
        parts.append(instruction)
    parts.append(f"Question: {question}")
    return "\n".join(parts)


def _citations_from_trace(trace: Sequence[TraceEntry], index: ChunkIndex) -> list[Citation]:
    """One citation per chunk the traced blocks overlap; score = the blocks' attention shares,
    each split over its chunks by token overlap."""
    scores: dict[int, float] = defaultdict(float)
    for t in trace:
        n = max(1, t.token_end - t.token_start)
        for cid in t.chunk_ids:
            if cid not in index.by_id:
                continue
            r = index.refs[index.by_id[cid]]
            overlap = min(r.token_end, t.token_end) - max(r.token_start, t.token_start)
            scores[cid] += t.attention * max(0, overlap) / n
    ranked = sorted(scores.items(), key=lambda kv: -kv[1])
    return [citation_of(index.refs[index.by_id[cid]], sc) for cid, sc in ranked if sc > 0]


def _sections(refs: Sequence[ChunkRef], section_tokens: int) -> list[list[ChunkRef]]:
    """Consecutive chunks grouped into sections of at most about ``section_tokens`` tokens."""
    sections: list[list[ChunkRef]] = []
    cur: list[ChunkRef] = []
    for r in refs:
        if cur and r.token_end - cur[0].token_start > section_tokens:
            sections.append(cur)
            cur = []
        cur.append(r)
    if cur:
        sections.append(cur)
    return sections


def _join_chunks(refs: Sequence[ChunkRef]) -> str:
    """Text of consecutive chunks without repeating the sentences they share (overlaps)."""
    out, end = [], -1
    for r in refs:
        if r.char_end <= end:
            continue
        start = max(r.char_start, end)
        out.append(r.text[start - r.char_start :].strip())
        end = r.char_end
    return "\n".join(p for p in out if p)


def collect_files(
    paths: Sequence[Path | str], include: Sequence[str] = (), exclude: Sequence[str] = (), recursive: bool = True
) -> list[tuple[str, Path]]:
    """(source name, path) of the files to ingest, in a stable order. A directory contributes its
    supported files (or those matching ``include`` globs), minus ``exclude`` globs; the source name
    is the path relative to the directory given (prefixed with its name), or the file's name."""
    out: list[tuple[str, Path]] = []
    seen: set[Path] = set()
    for p in map(Path, paths):
        if p.is_dir():
            it = p.rglob("*") if recursive else p.glob("*")
            for f in sorted(x for x in it if x.is_file()):
                rel = f.relative_to(p).as_posix()
                if any(part.startswith(".") for part in f.relative_to(p).parts):
                    continue
                if include:
                    if not any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(f.name, g) for g in include):
                        continue
                elif f.suffix.lower() not in SUPPORTED_SUFFIXES:
                    continue
                if any(fnmatch.fnmatch(rel, g) or fnmatch.fnmatch(f.name, g) for g in exclude):
                    continue
                if f.resolve() not in seen:
                    seen.add(f.resolve())
                    out.append((f"{p.resolve().name}/{rel}", f))
        elif p.exists():
            if p.resolve() not in seen:
                seen.add(p.resolve())
                out.append((p.name, p))
        else:
            raise FileNotFoundError(f"{p}: no such file or directory")
    return out


@contextlib.contextmanager
def _progress_bars(progress: bool | ProgressFn, n_docs: int, approx_tokens: int):
    """An event callback: a user's function, tqdm bars (documents; tokens with tokens/s and ETA), or nothing."""
    if callable(progress):
        yield progress
        return
    if not progress:
        yield lambda event, info: None
        return
    from tqdm import tqdm

    docs = tqdm(total=n_docs, desc="documents", unit="doc", position=0)
    toks = tqdm(total=max(approx_tokens, 1), desc="tokens", unit="tok", unit_scale=True, position=1)
    counts = defaultdict(int)

    def show(current: str = "") -> None:  # one postfix: "ready=3, error=1 | reading notes.md"
        done = ", ".join(f"{k}={v}" for k, v in counts.items())
        docs.set_postfix_str(" | ".join(x for x in (done, f"reading {current[-40:]}" if current else "") if x))

    def emit(event: str, info: dict[str, Any]) -> None:
        if event == "start":
            show(str(info["source"]))
        elif event == "tokens":
            if toks.n + info["n"] > toks.total:
                toks.total = toks.n + info["n"]
            toks.update(info["n"])
        elif event == "done":
            res = info["result"]
            counts[res.status] += 1
            docs.update(1)
            show()
            if res.status == "error":
                tqdm.write(f"skipped {res.source_name}: {res.error}")

    try:
        yield emit
    finally:
        toks.close()
        docs.close()


@contextlib.asynccontextmanager
async def temporary_service(settings, directory: Path, engine=None, embedder: Embedder | None = None, **kwargs: Any):
    """A service over a fresh SQLite database and data directory (evaluations, tests); the model is
    loaded from ``settings`` (its converted weights stay in the usual data directory)."""
    from memllm_storage import migrate
    from memllm_storage.engine import make_engine

    if engine is None:
        from memllm.engine import Engine
        from memllm.loading import load_model

        engine = Engine(load_model(settings), settings.memory, retrieval=settings.retrieval)
    directory = Path(directory)
    url = f"sqlite+aiosqlite:///{directory / 'memllm.db'}"
    eng = make_engine(url)
    await migrate.upgrade(eng)
    store = MemoryStore(eng, directory, owns_engine=True, ivf_threshold=settings.memory.ivf_threshold)
    try:
        yield KnowledgeService(store, engine, embedder, **kwargs)
    finally:
        await store.close()

"""Knowledge bases, their documents, query (answer with citations) and search (retrieval only)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from litestar import Controller, Request, Response, delete, get, post, put

from memllm.knowledge.staging import READING_STATUSES
from memllm_api.auth import Caller
from memllm_api.core import Core, ready_core
from memllm_api.errors import ERROR_RESPONSES, ApiError
from memllm_api.generation import AnswerGeneration, kb_citation
from memllm_api.ownership import get_row, owned_kb
from memllm_api.schemas import CreateKB, QueryRequest, SearchRequest
from memllm_api.sse import native_answer, streaming_post

ACCEPTED_WAIT_S = 5.0  # how long an upload waits for its document row before answering 202
MAX_DOCUMENT_NAME_CHARS = 1000
MAX_META_DEPTH = 16  # levels of objects/arrays in a document's meta
MAX_META_BYTES = 16 * 1024  # a document's meta as UTF-8 JSON


def lone_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate in ``text`` (JSON's "\\ud800" decodes to one; it has no
    UTF-8 form), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def check_text(value: str, param: str) -> None:
    """400 naming ``param`` if ``value`` holds a lone surrogate."""
    at = lone_surrogate(value)
    if at is not None:
        message = f"{param}: a lone surrogate (U+{ord(value[at]):04X}) at character {at} is not valid Unicode"
        raise ApiError(400, message, "invalid_unicode", param)


def json_depth(value: Any) -> int:
    """Levels of nested objects/arrays in a decoded JSON value (iterative: any depth is safe)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, depth = todo.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        todo.extend((child, depth + 1) for child in children)
    return deepest


def check_meta(meta: Any) -> dict[str, Any]:
    """A document's ``meta``: an object of at most MAX_META_DEPTH levels and MAX_META_BYTES as JSON."""
    if not isinstance(meta, dict):
        raise ApiError(400, "meta must be an object", "invalid_meta", "meta")
    if json_depth(meta) > MAX_META_DEPTH:
        raise ApiError(400, f"meta nests more than {MAX_META_DEPTH} levels", "invalid_meta", "meta")
    try:
        encoded = json.dumps(meta, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, "meta: a lone surrogate is not valid Unicode", "invalid_unicode", "meta") from None
    except (TypeError, ValueError) as exc:  # NaN is JSON to Python, not to SQLite's JSON
        raise ApiError(400, f"meta: {exc}", "invalid_meta", "meta") from None
    if len(encoded) > MAX_META_BYTES:
        message = f"meta is {len(encoded):,} bytes as JSON; the limit is {MAX_META_BYTES:,}"
        raise ApiError(400, message, "invalid_meta", "meta")
    return meta


def kb_json(info: Any, created_at: Any = None) -> dict[str, Any]:
    return {
        "id": info.id,
        "name": info.name,
        "description": info.description,
        "documents": info.documents,
        "ready_documents": info.ready,
        "tokens": info.tokens,
        "memory_blocks": info.blocks,
        "created_at": created_at.isoformat() if created_at else None,
    }


def document_json(row: Any, text: str | None = None, retryable: bool = False) -> dict[str, Any]:
    """A document in the API's shape; ``retryable``: failed, with its text kept for a retry."""
    out = {
        "id": row.id,
        "kb_id": row.knowledge_base_id,
        "name": row.source_name,
        "status": row.status,
        "tokens": row.token_count,
        "error": row.error,
        "retryable": retryable,
        "media_type": row.media_type,
        "created_at": row.created_at.isoformat() if row.created_at else None,
        "updated_at": row.updated_at.isoformat() if row.updated_at else None,
    }
    if text is not None:
        out["text"] = text
    return out


async def _kb_info(core: Core, caller: Caller, kb_id: int) -> dict[str, Any]:
    row = await owned_kb(core, caller, kb_id)
    infos = await core.knowledge.list_kbs(caller.tenant_id, kb_ids=[kb_id])
    return kb_json(infos[0], row.created_at)


async def read_document_body(request: Request, max_bytes: int) -> tuple[str, str, str, dict[str, Any]]:
    """(name, text, media type, meta) from a multipart upload (``file``, optional ``name``) or JSON
    ``{name, text, meta?}``. Parsing happens here, so a bad file is a 400 and nothing is stored."""
    from memllm.knowledge.parsing import BadDocumentError, parse_bytes

    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form()
        upload = form.get("file")
        if upload is None or not hasattr(upload, "read"):
            raise ApiError(400, "the multipart form needs a 'file' field", "missing_file", "file")
        data = await upload.read()
        if len(data) > max_bytes:
            raise ApiError(413, f"the file is larger than the limit of {max_bytes:,} bytes", "too_large", "file")
        name = str(form.get("name") or upload.filename or "").strip()
        if not name:
            raise ApiError(400, "the document needs a name (form field 'name' or a file name)", "missing_name", "name")
        try:
            docs = parse_bytes(data, name, max_bytes=max_bytes)
        except BadDocumentError as exc:
            raise ApiError(400, str(exc), "bad_document", "file") from None
        if len(docs) != 1:
            raise ApiError(400, f"{name}: holds {len(docs)} records; upload one document per request", "many_records")
        return name[:1000], docs[0].text, docs[0].media_type, dict(docs[0].meta)
    if ctype in ("application/json", ""):
        try:
            body = json.loads(await request.body() or b"null", parse_constant=_no_constant)
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the body is not valid JSON", "invalid_json") from None
        except RecursionError:
            message = f"the body is nested too deeply (meta may nest {MAX_META_DEPTH} levels)"
            raise ApiError(400, message, "too_deep", "meta") from None
        if not isinstance(body, dict) or not isinstance(body.get("name"), str) or not isinstance(body.get("text"), str):
            raise ApiError(400, "send JSON {name, text, meta?} or a multipart form with a 'file'", "invalid_body")
        name, text, meta = body["name"].strip(), body["text"], body.get("meta") or {}
        if not name or len(name) > MAX_DOCUMENT_NAME_CHARS:
            message = f"the document name must have 1 to {MAX_DOCUMENT_NAME_CHARS} characters"
            raise ApiError(400, message, "invalid_name", "name")
        check_text(name, "name")
        check_text(text, "text")
        meta = check_meta(meta)
        if len(text.encode()) > max_bytes:
            raise ApiError(413, f"the document is larger than the limit of {max_bytes:,} bytes", "too_large")
        from memllm.knowledge.parsing import clean_text

        if not clean_text(text):
            raise ApiError(400, f"{name}: no text", "bad_document", "text")
        return name, text, "text/plain", meta
    raise ApiError(415, f"unsupported content type {ctype!r}: use application/json or multipart/form-data", "media")


def _no_constant(name: str) -> Any:
    """``json.loads`` accepts NaN and Infinity, which are not JSON: refuse them."""
    raise ValueError(f"{name} is not JSON")


async def start_ingestion(core: Core, kb_id: int, name: str, text: str, media_type: str, meta: dict) -> Any:
    """Ingest in the background; returns the document row as soon as it exists (202 semantics).

    A new name gets a ``pending`` row at once; re-sending a name replaces that document (the old
    version keeps answering until the new one is ready, then one swap)."""
    from memllm.knowledge.service import KnowledgeError

    loop = asyncio.get_running_loop()
    known: asyncio.Future[int | None] = loop.create_future()

    def progress(event: str, info: dict[str, Any]) -> None:
        if event == "status" and not known.done():
            known.set_result(info.get("document_id"))
        elif event == "tokens" and getattr(core, "metrics", None) is not None:
            core.metrics.ingest_tokens.inc(info.get("n", 0))

    async def run() -> None:
        try:
            await core.knowledge.ingest_text(kb_id, name, text, meta=meta, media_type=media_type, progress=progress)
        finally:
            if not known.done():
                known.set_result(None)

    task = core.spawn(run())
    try:
        doc_id = await asyncio.wait_for(asyncio.shield(known), ACCEPTED_WAIT_S)
    except TimeoutError:
        doc_id = None
    if task.done() and task.exception() is not None:
        exc = task.exception()
        raise ApiError(400, str(exc), "ingest_failed") if isinstance(exc, KnowledgeError) else exc
    if doc_id is not None:
        return await core.knowledge.get_document(kb_id, doc_id)
    return await _document_named(core, kb_id, name)


async def _document_named(core: Core, kb_id: int, name: str) -> Any:
    """The document of ``kb_id`` whose source name is ``name``: by name only (a name of digits, or of
    Unicode digits such as "²", is not an id)."""
    from memllm_storage.repositories import DocumentRepository, NotFoundError

    async with core.store.sessions() as db:
        row = await DocumentRepository(db).get_by_source(kb_id, name)
    if row is None:
        raise NotFoundError(f"document {name!r} not found in knowledge base {kb_id}")
    return row


class KnowledgeController(Controller):
    path = "/api/kbs"
    tags = ("knowledge bases",)

    @post("/", status_code=201, summary="Create a knowledge base", responses=ERROR_RESPONSES)
    async def create(self, request: Request, caller: Caller, data: CreateKB) -> dict[str, Any]:
        core = ready_core(request)
        from memllm.knowledge.service import KnowledgeError

        name = data.name.strip()
        if not name:
            raise ApiError(400, "name: a knowledge base needs a name that is not blank", "invalid_name", "name")
        try:
            row = await core.knowledge.create_kb(name, data.description, tenant_id=caller.tenant_id)
        except KnowledgeError as exc:
            raise ApiError(409, str(exc), "kb_exists", "name") from None
        return await _kb_info(core, caller, row.id)

    @get("/", summary="List knowledge bases", responses=ERROR_RESPONSES)
    async def list_kbs(self, request: Request, caller: Caller) -> dict[str, Any]:
        core = ready_core(request)
        from memllm_storage.models import KnowledgeBase

        infos = await core.knowledge.list_kbs(caller.tenant_id)
        async with core.store.sessions() as db:
            created = {i.id: (await db.get(KnowledgeBase, i.id)).created_at for i in infos}
        return {"data": [kb_json(i, created[i.id]) for i in infos]}

    @get("/{kb_id:int}", summary="Get a knowledge base", responses=ERROR_RESPONSES)
    async def get_kb(self, request: Request, caller: Caller, kb_id: int) -> dict[str, Any]:
        return await _kb_info(ready_core(request), caller, kb_id)

    @delete(
        "/{kb_id:int}",
        status_code=204,
        summary="Delete a knowledge base with its documents and memory",
        responses=ERROR_RESPONSES,
    )
    async def delete_kb(self, request: Request, caller: Caller, kb_id: int) -> None:
        core = ready_core(request)
        await owned_kb(core, caller, kb_id)
        await core.knowledge.delete_kb(kb_id)

    # ---------------------------------------------------------------------------- documents
    @post(
        "/{kb_id:int}/documents",
        status_code=202,
        summary="Add a document (multipart file or JSON text)",
        responses=ERROR_RESPONSES,
    )
    async def add_document(self, request: Request, caller: Caller, kb_id: int) -> dict[str, Any]:
        core = ready_core(request)
        await owned_kb(core, caller, kb_id)
        name, text, media, meta = await read_document_body(request, core.api.max_upload_bytes)
        return document_json(await start_ingestion(core, kb_id, name, text, media, meta))

    @get("/{kb_id:int}/documents", summary="List documents with their status", responses=ERROR_RESPONSES)
    async def list_documents(
        self, request: Request, caller: Caller, kb_id: int, status: str | None = None
    ) -> dict[str, Any]:
        core = ready_core(request)
        await owned_kb(core, caller, kb_id)
        rows = await core.knowledge.list_documents(kb_id)
        if any(r.status in READING_STATUSES for r in rows) and await core.knowledge.recover_interrupted(kb_id):
            rows = await core.knowledge.list_documents(kb_id)  # a reader died (another process): say so
        rows = [r for r in rows if status is None or r.status == status]
        return {"data": [document_json(r, retryable=core.knowledge.retryable(r)) for r in rows]}

    @get("/{kb_id:int}/documents/{doc_id:int}", summary="Get a document", responses=ERROR_RESPONSES)
    async def get_document(
        self, request: Request, caller: Caller, kb_id: int, doc_id: int, include_text: bool = False
    ) -> dict[str, Any]:
        core = ready_core(request)
        await owned_kb(core, caller, kb_id)
        row = await _document(core, kb_id, doc_id)
        text = await core.knowledge.document_text(kb_id, doc_id) if include_text and row.status == "ready" else None
        return document_json(row, text, retryable=core.knowledge.retryable(row))

    @post(
        "/{kb_id:int}/documents/{doc_id:int}/retry",
        status_code=202,
        summary="Ingest a failed or interrupted document again, from its kept text",
        responses=ERROR_RESPONSES,
    )
    async def retry_document(self, request: Request, caller: Caller, kb_id: int, doc_id: int) -> dict[str, Any]:
        from memllm.knowledge.service import KnowledgeError

        core = ready_core(request)
        await owned_kb(core, caller, kb_id)
        await _document(core, kb_id, doc_id)
        try:
            staged = await core.knowledge.staged_for_retry(kb_id, doc_id)
        except KnowledgeError as exc:
            raise ApiError(409, str(exc), "not_retryable") from None
        row = await start_ingestion(core, kb_id, staged.name, staged.text, staged.media_type, staged.meta)
        return document_json(row, retryable=core.knowledge.retryable(row))

    @put(
        "/{kb_id:int}/documents/{doc_id:int}",
        status_code=202,
        summary="Replace a document's text",
        responses=ERROR_RESPONSES,
    )
    async def replace_document(self, request: Request, caller: Caller, kb_id: int, doc_id: int) -> dict[str, Any]:
        core = ready_core(request)
        await owned_kb(core, caller, kb_id)
        row = await _document(core, kb_id, doc_id)
        _name, text, media, meta = await read_document_body(request, core.api.max_upload_bytes)
        return document_json(await start_ingestion(core, kb_id, row.source_name, text, media, meta))

    @delete(
        "/{kb_id:int}/documents/{doc_id:int}",
        status_code=204,
        summary="Delete a document and its memory",
        responses=ERROR_RESPONSES,
    )
    async def delete_document(self, request: Request, caller: Caller, kb_id: int, doc_id: int) -> None:
        core = ready_core(request)
        await owned_kb(core, caller, kb_id)
        await _document(core, kb_id, doc_id)
        await core.knowledge.delete_document(kb_id, doc_id)

    # ------------------------------------------------------------------------ query, search
    @streaming_post("/{kb_id:int}/query", "Answer a question with citations (streamed with stream=true)")
    async def query(self, request: Request, caller: Caller, kb_id: int, data: QueryRequest) -> Response:
        core = ready_core(request)
        await owned_kb(core, caller, kb_id)
        max_tokens = core.api.output_tokens(data.max_tokens)
        gen = AnswerGeneration(
            core, kb_id, data.question, mode=data.mode, k=data.k, max_tokens=max_tokens, temperature=data.temperature
        )
        return await native_answer(gen, data.stream, lambda o: {"answer": o.text, "mode": data.mode})

    @post(
        "/{kb_id:int}/search",
        status_code=200,
        summary="Retrieve the best passages (no generation)",
        responses=ERROR_RESPONSES,
    )
    async def search(self, request: Request, caller: Caller, kb_id: int, data: SearchRequest) -> dict[str, Any]:
        core = ready_core(request)
        await owned_kb(core, caller, kb_id)
        hits = await core.knowledge.search(kb_id, data.query, k=data.k, method=data.method)
        return {"data": [kb_citation(kb_id, c) for c in hits]}


async def _document(core: Core, kb_id: int, doc_id: int) -> Any:
    from memllm_storage.models import Document

    row = await get_row(core, Document, doc_id)
    if row is None or row.knowledge_base_id != kb_id:
        raise ApiError(404, f"document {doc_id} not found in knowledge base {kb_id}", "document_not_found")
    return row


__all__ = ["KnowledgeController"]

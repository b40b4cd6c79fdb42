"""Persistence for memllm: SQLAlchemy models and repositories, Alembic migrations, the KV block
store, FAISS index manager and the persistent memory source. See storage/README.md.

Typical use (services)::

    store = await MemoryStore.from_settings(settings)        # refuses an unmigrated database
    async with store.writer(Owner.kb(kb_id), layout) as w:   # all-or-nothing
        doc, old = await w.replace_document(kb_id, "a.txt", sha256=h, status="ready")
        await w.add_blocks(blocks, document_id=doc.id)
    source = await store.open_source(Owner.kb(kb_id))        # a MemorySource for the engine
"""

from memllm_storage.migrate import DatabaseNotMigratedError, check_at_head
from memllm_storage.owners import Owner
from memllm_storage.repositories import NotFoundError
from memllm_storage.source import PersistentSource
from memllm_storage.store import CompactionReport, LayoutMismatchError, MemoryStore
from memllm_storage.writer import OwnerWriter

__all__ = [
    "CompactionReport",
    "DatabaseNotMigratedError",
    "LayoutMismatchError",
    "MemoryStore",
    "NotFoundError",
    "Owner",
    "OwnerWriter",
    "PersistentSource",
    "check_at_head",
]

"""One all-or-nothing write to an owner's memory (see :meth:`memllm_storage.store.MemoryStore.writer`).

Order of a write, each step durable before the next starts:

1. payload records are appended to the owner's active payload file (``add_blocks``), then fsynced;
2. rows (blocks, and whatever the caller wrote through ``session`` / the repositories: documents,
   chunks, messages) plus the owner's ``index_state`` are committed in **one** transaction;
3. the in-process indexes are updated and (per checkpoint policy) saved atomically.

A crash before 2 leaves orphan payload bytes past the last committed record: no row points at
them, the next writer truncates them. A crash after 2 leaves index files behind the database:
the next open repairs them from rows + payloads. So after any crash the write is fully present or
fully absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy.ext.asyncio import AsyncSession

from memllm.memory.types import MemoryBlock
from memllm_storage.blockfile import PayloadWriter, encode_block
from memllm_storage.models import Chunk, Document, MemoryBlockRow
from memllm_storage.owners import Owner
from memllm_storage.repositories import (
    BlockRepository,
    ChunkRepository,
    DocumentRepository,
    MessageRepository,
    SessionRepository,
)
from memllm_storage.source import BlockEntry, PersistentSource


class OwnerWriter:
    """Handed out inside ``MemoryStore.writer(owner)``; holds the owner's locks and transaction."""

    def __init__(
        self,
        session: AsyncSession,
        owner: Owner,
        source: PersistentSource,
        payload: PayloadWriter,
        payload_dtype: str,
    ) -> None:
        self.session = session
        self.owner = owner
        self.source = source
        self.payload = payload
        self.payload_dtype = payload_dtype
        self.added: list[tuple[int, BlockEntry]] = []
        self.removed: dict[int, int] = {}  # block id -> representatives
        self.moved: list[tuple[int, BlockEntry]] = []
        self.documents = DocumentRepository(session)
        self.chunks = ChunkRepository(session)
        self.messages = MessageRepository(session)
        self.sessions = SessionRepository(session)
        self.blocks = BlockRepository(session)

    async def add_blocks(
        self,
        blocks: Sequence[MemoryBlock],
        *,
        document_id: int | None = None,
        chunk_ids: Sequence[int | None] | None = None,
        message_ids: Sequence[int | None] | None = None,
        payload_dtype: str | None = None,
    ) -> list[int]:
        """Append payloads and insert rows for ``blocks``; returns their block ids (in order).

        Blocks must fit the owner's layout. ``chunk_ids`` / ``message_ids`` give each block's
        provenance (the chunk or message its first token came from).
        """
        lay = self.source.layout
        for b in blocks:
            if (
                (b.keys.shape[0], b.keys.shape[1], b.keys.shape[3]) != (lay.n_layers, lay.n_kv_heads, lay.head_dim)
                or b.length > lay.block_size
                or b.representatives.shape[2] != lay.search_dim
            ):
                raise ValueError(f"block keys {b.keys.shape} / reps {b.representatives.shape} do not fit {lay}")
        for name, seq in (("chunk_ids", chunk_ids), ("message_ids", message_ids)):
            if seq is not None and len(seq) != len(blocks):
                raise ValueError(f"{name} has {len(seq)} entries for {len(blocks)} blocks")
        records = [encode_block(b, payload_dtype or self.payload_dtype) for b in blocks]
        locations = self.payload.append(records)
        rows = []
        for i, (b, (offset, length, crc)) in enumerate(zip(blocks, locations, strict=True)):
            rows.append(
                MemoryBlockRow(
                    **self.owner.owner_values(),
                    document_id=document_id,
                    chunk_id=chunk_ids[i] if chunk_ids is not None else None,
                    message_id=message_ids[i] if message_ids is not None else None,
                    token_start=b.token_start,
                    token_end=b.token_end,
                    n_representatives=b.representatives.shape[1],
                    payload_file=self.payload.path.name,
                    payload_offset=offset,
                    payload_length=length,
                    payload_checksum=crc,
                )
            )
        self.session.add_all(rows)
        await self.session.flush()
        self.added.extend((r.id, BlockEntry.from_row(r)) for r in rows)
        return [r.id for r in rows]

    async def delete_blocks(self, block_ids: Sequence[int]) -> int:
        """Delete blocks of this owner by id; returns how many existed."""
        from sqlalchemy import delete, select

        ids = [int(i) for i in block_ids]
        col = getattr(MemoryBlockRow, self.owner.column)
        q = select(MemoryBlockRow.id, MemoryBlockRow.n_representatives).where(
            MemoryBlockRow.id.in_(ids), col == self.owner.id
        )
        found = [(int(i), int(r)) for i, r in (await self.session.execute(q)).all()]
        if found:
            await self.session.execute(delete(MemoryBlockRow).where(MemoryBlockRow.id.in_([i for i, _ in found])))
        self._forget(found)
        return len(found)

    async def delete_document(self, document_id: int) -> bool:
        """Delete a document of this knowledge base with its chunks and blocks; False if absent."""
        doc = await self.session.get(Document, document_id)
        if doc is None or self.owner != Owner.kb(doc.knowledge_base_id):
            return False
        self._forget(await self.blocks.ids_for_document(document_id))
        await self.documents.delete(document_id)
        return True

    async def clear_document(self, document_id: int) -> None:
        """Delete a document's blocks (rows and vectors) and chunks in this write; its row stays."""
        from sqlalchemy import delete

        self._forget(await self.blocks.ids_for_document(document_id))
        await self.session.execute(delete(MemoryBlockRow).where(MemoryBlockRow.document_id == document_id))
        await self.session.execute(delete(Chunk).where(Chunk.document_id == document_id))

    async def refill_document(self, document_id: int, **fields: Any) -> Document | None:
        """Give a document new content under the same id, in this write: its old chunks and blocks
        go, ``fields`` are set on its row; add the new chunks and blocks after. None when the row is
        gone (deleted meanwhile: writers of the owner are serialized, so this check is final)."""
        doc = await self.session.get(Document, document_id, populate_existing=True)
        if doc is None or self.owner != Owner.kb(doc.knowledge_base_id):
            return None
        await self.clear_document(document_id)
        for name, value in fields.items():
            setattr(doc, name, value)
        await self.session.flush()
        return doc

    async def replace_document(self, kb_id: int, source_name: str, **fields: Any) -> tuple[Document, Document | None]:
        """Delete the document named ``source_name`` (if any: rows and blocks) and create a new one,
        in this write; returns (new, old)."""
        if self.owner != Owner.kb(kb_id):
            raise ValueError(f"writer of {self.owner} cannot write documents of kb-{kb_id}")
        old = await self.documents.get_by_source(kb_id, source_name)
        if old is not None:
            await self.delete_document(old.id)
            await self.session.flush()
        return await self.documents.create(kb_id, source_name, **fields), old

    def _forget(self, found: Sequence[tuple[int, int]]) -> None:
        added = {i for i, _ in self.added}
        for bid, reps in found:
            if bid in added:
                self.added = [(i, e) for i, e in self.added if i != bid]
            else:
                self.removed[bid] = reps

    def index_state_after(self) -> tuple[int, int]:
        """(vector count, id-set checksum) every layer's index must hold after this write."""
        from memllm_storage.checksums import combine, id_set_checksum

        count, checksum = self.source.committed_summary()
        count += sum(e.n_reps for _, e in self.added) - sum(self.removed.values())
        add = id_set_checksum(np.array([i for i, _ in self.added], np.int64))
        rem = id_set_checksum(np.array(list(self.removed), np.int64))
        return count, combine(checksum, add, rem)

"""SQLAlchemy 2 ORM models: the persistent truth of memllm.

Invariants (enforced by constraints where the database can, documented otherwise):

* A memory block belongs to exactly one owner: a knowledge base or a chat session
  (``ck_memory_blocks_one_owner``). Its ``id`` is the int64 block id used in FAISS indexes and
  memory views, so it is never reused (ids only grow; every table uses SQLite ``AUTOINCREMENT``
  so deleted ids are not handed out again there either).
* A block's payload lives in ``payload_file`` (a name relative to its owner's directory) at
  ``[payload_offset, payload_offset + payload_length)``, with ``payload_checksum`` = crc32 of those
  bytes. Bytes of a payload file not covered by a committed row are garbage (orphans of a crashed
  write, or deleted blocks awaiting compaction).
* ``index_state`` holds, per owner and memory layer, what that layer's FAISS index must contain
  after the last commit: ``vector_count`` representatives over the live blocks, and
  ``id_checksum`` (see :func:`memllm_storage.checksums.id_set_checksum`) of their id set. It is written in
  the same transaction as the block rows it describes.
* Deleting a knowledge base, document or session cascades to its chunks, messages, blocks and
  index state (``ON DELETE CASCADE``; SQLite needs ``PRAGMA foreign_keys=ON``, set by
  :mod:`memllm_storage.engine`).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# BIGINT primary keys autoincrement on PostgreSQL; on SQLite only "INTEGER PRIMARY KEY" is the rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Ids are never reused, also on SQLite (a reused document or block id could make an old citation or
# a stale reader point at new content; readers detect new blocks by their ids growing).
AUTOINC = {"sqlite_autoincrement": True}

DOCUMENT_STATUSES = ("pending", "parsing", "encoding", "ready", "error")
MESSAGE_ROLES = ("system", "user", "assistant", "tool")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON}  # noqa: RUF012


class TimestampMixin:
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow, server_default=func.now()
    )


class Tenant(TimestampMixin, Base):
    __tablename__ = "tenants"
    __table_args__ = (AUTOINC,)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)


class ApiKey(Base):
    """An API key, stored as sha256(key) hex; the plaintext is shown once at creation."""

    __tablename__ = "api_keys"
    __table_args__ = (AUTOINC,)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("tenants.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    prefix: Mapped[str] = mapped_column(String(16))  # first characters, for display
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class KnowledgeBase(TimestampMixin, Base):
    """A named collection of documents; owner of memory blocks (one stream per document).

    ``memory_layout`` (JSON of :class:`memllm.memory.types.BlockLayout`) and ``model`` are fixed by
    the first block written: keys of one model are meaningless to another.
    """

    __tablename__ = "knowledge_bases"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_knowledge_bases_tenant_name"), AUTOINC)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("tenants.id", ondelete="CASCADE"), index=True, nullable=True
    )
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    memory_layout: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class Document(TimestampMixin, Base):
    """One source document of a knowledge base; ``source_name`` is unique within the KB."""

    __tablename__ = "documents"
    __table_args__ = (
        UniqueConstraint("knowledge_base_id", "source_name", name="uq_documents_kb_source"),
        CheckConstraint(f"status IN {DOCUMENT_STATUSES!r}", name="status"),
        AUTOINC,
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    knowledge_base_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("knowledge_bases.id", ondelete="CASCADE"), index=True
    )
    source_name: Mapped[str] = mapped_column(String(1000))
    media_type: Mapped[str] = mapped_column(String(200), default="text/plain")
    sha256: Mapped[str] = mapped_column(String(64))
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    token_count: Mapped[int] = mapped_column(BigInteger, default=0)
    char_count: Mapped[int] = mapped_column(BigInteger, default=0)


class Chunk(Base):
    """A text chunk of a document: character span in the text, token span in its memory stream."""

    __tablename__ = "chunks"
    __table_args__ = (UniqueConstraint("document_id", "ordinal", name="uq_chunks_document_ordinal"), AUTOINC)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    document_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("documents.id", ondelete="CASCADE"), index=True)
    ordinal: Mapped[int] = mapped_column(Integer)
    char_start: Mapped[int] = mapped_column(BigInteger)
    char_end: Mapped[int] = mapped_column(BigInteger)
    token_start: Mapped[int] = mapped_column(BigInteger)
    token_end: Mapped[int] = mapped_column(BigInteger)
    text: Mapped[str] = mapped_column(Text)


class ChatSession(TimestampMixin, Base):
    """A chat session; owner of memory blocks over its token stream (all turns, in order)."""

    __tablename__ = "sessions"
    __table_args__ = (UniqueConstraint("tenant_id", "name", name="uq_sessions_tenant_name"), AUTOINC)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    tenant_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("tenants.id", ondelete="CASCADE"), index=True, nullable=True
    )
    name: Mapped[str] = mapped_column(String(200))
    model: Mapped[str | None] = mapped_column(String(200), nullable=True)
    memory_layout: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    token_count: Mapped[int] = mapped_column(BigInteger, default=0)  # length of the memory stream


class Message(Base):
    """One chat turn; ``[token_start, token_end)`` is its span in the session's memory stream."""

    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("session_id", "ordinal", name="uq_messages_session_ordinal"),
        CheckConstraint(f"role IN {MESSAGE_ROLES!r}", name="role"),
        AUTOINC,
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    session_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("sessions.id", ondelete="CASCADE"), index=True)
    ordinal: Mapped[int] = mapped_column(Integer)
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    token_start: Mapped[int] = mapped_column(BigInteger, default=0)
    token_end: Mapped[int] = mapped_column(BigInteger, default=0)
    meta: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())


class MemoryBlockRow(Base):
    """One memory block: token span in its owner stream, provenance, and payload location."""

    __tablename__ = "memory_blocks"
    __table_args__ = (
        CheckConstraint(
            "(knowledge_base_id IS NULL) <> (session_id IS NULL)",
            name="one_owner",
        ),
        Index("ix_memory_blocks_kb", "knowledge_base_id", "id"),
        Index("ix_memory_blocks_session", "session_id", "id"),
        AUTOINC,
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    knowledge_base_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("knowledge_bases.id", ondelete="CASCADE"), nullable=True
    )
    session_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("sessions.id", ondelete="CASCADE"), nullable=True
    )
    document_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("documents.id", ondelete="CASCADE"), index=True, nullable=True
    )
    chunk_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("chunks.id", ondelete="SET NULL"), nullable=True
    )
    message_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("messages.id", ondelete="SET NULL"), nullable=True
    )
    token_start: Mapped[int] = mapped_column(BigInteger)
    token_end: Mapped[int] = mapped_column(BigInteger)
    n_representatives: Mapped[int] = mapped_column(Integer)
    payload_file: Mapped[str] = mapped_column(String(200))
    payload_offset: Mapped[int] = mapped_column(BigInteger)
    payload_length: Mapped[int] = mapped_column(BigInteger)
    payload_checksum: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, server_default=func.now())


class IndexState(Base):
    """Per owner and memory layer: what that layer's FAISS index must hold (see module docstring)."""

    __tablename__ = "index_state"
    __table_args__ = (
        CheckConstraint("(knowledge_base_id IS NULL) <> (session_id IS NULL)", name="one_owner"),
        UniqueConstraint("knowledge_base_id", "layer", name="uq_index_state_kb_layer"),
        UniqueConstraint("session_id", "layer", name="uq_index_state_session_layer"),
        AUTOINC,
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    knowledge_base_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("knowledge_bases.id", ondelete="CASCADE"), nullable=True
    )
    session_id: Mapped[int | None] = mapped_column(
        BigInteger, ForeignKey("sessions.id", ondelete="CASCADE"), nullable=True
    )
    layer: Mapped[int] = mapped_column(Integer)
    file: Mapped[str] = mapped_column(String(200))
    vector_count: Mapped[int] = mapped_column(BigInteger, default=0)
    id_checksum: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[dt.datetime] = mapped_column(
        DateTime(timezone=True), default=utcnow, onupdate=utcnow, server_default=func.now()
    )

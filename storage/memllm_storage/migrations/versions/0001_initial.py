"""Initial schema: tenants, API keys, knowledge bases, documents, chunks, sessions, messages,
memory blocks and index state.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False)


def _fk(col: str, ref: str, table: str, ondelete: str = "CASCADE") -> sa.ForeignKeyConstraint:
    ref_table = ref.split(".")[0]
    return sa.ForeignKeyConstraint([col], [ref], ondelete=ondelete, name=f"fk_{table}_{col}_{ref_table}")


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", BigId, primary_key=True),
        sa.Column("name", sa.String(200), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
        sa.UniqueConstraint("name", name="uq_tenants_name"),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "api_keys",
        sa.Column("id", BigId, nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        _ts("created_at"),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("key_hash", name="uq_api_keys_key_hash"),
        _fk("tenant_id", "tenants.id", "api_keys"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])

    op.create_table(
        "knowledge_bases",
        sa.Column("id", BigId, nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("memory_layout", sa.JSON(), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_knowledge_bases"),
        sa.UniqueConstraint("tenant_id", "name", name="uq_knowledge_bases_tenant_name"),
        _fk("tenant_id", "tenants.id", "knowledge_bases"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_knowledge_bases_tenant_id", "knowledge_bases", ["tenant_id"])

    op.create_table(
        "documents",
        sa.Column("id", BigId, nullable=False),
        sa.Column("knowledge_base_id", sa.BigInteger(), nullable=False),
        sa.Column("source_name", sa.String(1000), nullable=False),
        sa.Column("media_type", sa.String(200), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("token_count", sa.BigInteger(), nullable=False),
        sa.Column("char_count", sa.BigInteger(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_documents"),
        sa.UniqueConstraint("knowledge_base_id", "source_name", name="uq_documents_kb_source"),
        sa.CheckConstraint("status IN ('pending', 'parsing', 'encoding', 'ready', 'error')", name="status"),
        _fk("knowledge_base_id", "knowledge_bases.id", "documents"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_documents_knowledge_base_id", "documents", ["knowledge_base_id"])

    op.create_table(
        "chunks",
        sa.Column("id", BigId, nullable=False),
        sa.Column("document_id", sa.BigInteger(), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("char_start", sa.BigInteger(), nullable=False),
        sa.Column("char_end", sa.BigInteger(), nullable=False),
        sa.Column("token_start", sa.BigInteger(), nullable=False),
        sa.Column("token_end", sa.BigInteger(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_chunks"),
        sa.UniqueConstraint("document_id", "ordinal", name="uq_chunks_document_ordinal"),
        _fk("document_id", "documents.id", "chunks"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_chunks_document_id", "chunks", ["document_id"])

    op.create_table(
        "sessions",
        sa.Column("id", BigId, nullable=False),
        sa.Column("tenant_id", sa.BigInteger(), nullable=True),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=True),
        sa.Column("memory_layout", sa.JSON(), nullable=True),
        sa.Column("metadata", sa.JSON(), nullable=False),
        sa.Column("token_count", sa.BigInteger(), nullable=False),
        _ts("created_at"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_sessions"),
        sa.UniqueConstraint("tenant_id", "name", name="uq_sessions_tenant_name"),
        _fk("tenant_id", "tenants.id", "sessions"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_sessions_tenant_id", "sessions", ["tenant_id"])

    op.create_table(
        "messages",
        sa.Column("id", BigId, nullable=False),
        sa.Column("session_id", sa.BigInteger(), nullable=False),
        sa.Column("ordinal", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("token_start", sa.BigInteger(), nullable=False),
        sa.Column("token_end", sa.BigInteger(), nullable=False),
        sa.Column("metadata", sa.JSON(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        sa.UniqueConstraint("session_id", "ordinal", name="uq_messages_session_ordinal"),
        sa.CheckConstraint("role IN ('system', 'user', 'assistant', 'tool')", name="role"),
        _fk("session_id", "sessions.id", "messages"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_messages_session_id", "messages", ["session_id"])

    op.create_table(
        "memory_blocks",
        sa.Column("id", BigId, nullable=False),
        sa.Column("knowledge_base_id", sa.BigInteger(), nullable=True),
        sa.Column("session_id", sa.BigInteger(), nullable=True),
        sa.Column("document_id", sa.BigInteger(), nullable=True),
        sa.Column("chunk_id", sa.BigInteger(), nullable=True),
        sa.Column("message_id", sa.BigInteger(), nullable=True),
        sa.Column("token_start", sa.BigInteger(), nullable=False),
        sa.Column("token_end", sa.BigInteger(), nullable=False),
        sa.Column("n_representatives", sa.Integer(), nullable=False),
        sa.Column("payload_file", sa.String(200), nullable=False),
        sa.Column("payload_offset", sa.BigInteger(), nullable=False),
        sa.Column("payload_length", sa.BigInteger(), nullable=False),
        sa.Column("payload_checksum", sa.BigInteger(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_memory_blocks"),
        sa.CheckConstraint("(knowledge_base_id IS NULL) <> (session_id IS NULL)", name="one_owner"),
        _fk("knowledge_base_id", "knowledge_bases.id", "memory_blocks"),
        _fk("session_id", "sessions.id", "memory_blocks"),
        _fk("document_id", "documents.id", "memory_blocks"),
        _fk("chunk_id", "chunks.id", "memory_blocks", ondelete="SET NULL"),
        _fk("message_id", "messages.id", "memory_blocks", ondelete="SET NULL"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_memory_blocks_kb", "memory_blocks", ["knowledge_base_id", "id"])
    op.create_index("ix_memory_blocks_session", "memory_blocks", ["session_id", "id"])
    op.create_index("ix_memory_blocks_document_id", "memory_blocks", ["document_id"])

    op.create_table(
        "index_state",
        sa.Column("id", BigId, nullable=False),
        sa.Column("knowledge_base_id", sa.BigInteger(), nullable=True),
        sa.Column("session_id", sa.BigInteger(), nullable=True),
        sa.Column("layer", sa.Integer(), nullable=False),
        sa.Column("file", sa.String(200), nullable=False),
        sa.Column("vector_count", sa.BigInteger(), nullable=False),
        sa.Column("id_checksum", sa.BigInteger(), nullable=False),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("id", name="pk_index_state"),
        sa.CheckConstraint("(knowledge_base_id IS NULL) <> (session_id IS NULL)", name="one_owner"),
        sa.UniqueConstraint("knowledge_base_id", "layer", name="uq_index_state_kb_layer"),
        sa.UniqueConstraint("session_id", "layer", name="uq_index_state_session_layer"),
        _fk("knowledge_base_id", "knowledge_bases.id", "index_state"),
        _fk("session_id", "sessions.id", "index_state"),
        sqlite_autoincrement=True,
    )


def downgrade() -> None:
    for table in (
        "index_state",
        "memory_blocks",
        "messages",
        "sessions",
        "chunks",
        "documents",
        "knowledge_bases",
        "api_keys",
        "tenants",
    ):
        op.drop_table(table)

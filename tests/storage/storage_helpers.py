"""Helpers shared by the storage tests and their child processes (no pytest imports)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from memllm.memory.types import BlockLayout, MemoryBlock
from memllm_storage.engine import make_engine
from memllm_storage.store import MemoryStore

LAYOUT = BlockLayout(layers=(0, 2), n_kv_heads=2, head_dim=8, block_size=16, representatives=4)


def make_block(seed: int, start: int = 0, length: int | None = None, layout: BlockLayout = LAYOUT) -> MemoryBlock:
    """A deterministic random block; its representatives are distinct unit-ish vectors."""
    rng = np.random.default_rng(seed)
    n = layout.block_size if length is None else length
    shape = (layout.n_layers, layout.n_kv_heads, n, layout.head_dim)
    keys = rng.standard_normal(shape).astype(np.float16)
    values = rng.standard_normal(shape).astype(np.float16)
    reps = rng.standard_normal((layout.n_layers, layout.representatives, layout.search_dim)).astype(np.float32)
    return MemoryBlock(keys, values, reps, start, start + n)


def doc_blocks(doc_no: int, n_blocks: int = 3) -> list[MemoryBlock]:
    return [make_block(1000 * doc_no + i, start=i * LAYOUT.block_size) for i in range(n_blocks)]


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def store_for(url: str, schema: str | None, data_dir: Path, **kwargs) -> MemoryStore:
    kwargs.setdefault("checkpoint_fraction", 0.0)
    return MemoryStore(make_engine(url, schema=schema), data_dir, owns_engine=True, **kwargs)


async def ingest_doc(store: MemoryStore, kb_id: int, doc_no: int, n_blocks: int = 3) -> int:
    """One document, its chunks and blocks in one all-or-nothing write; returns the document id."""
    from memllm_storage.owners import Owner

    blocks = doc_blocks(doc_no, n_blocks)
    async with store.writer(Owner.kb(kb_id), LAYOUT, model="test-model") as w:
        doc, _ = await w.replace_document(
            kb_id,
            f"doc-{doc_no}.txt",
            sha256=sha(str(doc_no)),
            status="ready",
            token_count=n_blocks * LAYOUT.block_size,
            meta={"n": doc_no},
        )
        chunks = await w.chunks.add_many(
            doc.id,
            [
                {
                    "ordinal": i,
                    "char_start": 100 * i,
                    "char_end": 100 * (i + 1),
                    "token_start": b.token_start,
                    "token_end": b.token_end,
                    "text": f"doc {doc_no} chunk {i}",
                }
                for i, b in enumerate(blocks)
            ],
        )
        await w.add_blocks(blocks, document_id=doc.id, chunk_ids=[c.id for c in chunks])
        return doc.id

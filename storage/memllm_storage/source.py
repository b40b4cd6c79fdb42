"""The persistent memory source: one owner's blocks (a knowledge base or a chat session).

``PersistentSource`` implements ``MemorySource`` / ``WritableMemorySource`` of
:mod:`memllm.memory.source`, so ``MemoryView([InMemorySource(...), PersistentSource(session),
PersistentSource(kb)])`` works.

Hot path (synchronous, no event loop, thread-safe): ``search``, ``fetch``, ``num_blocks``,
``spans``, ``add``. They use only in-process state: one FAISS index per memory layer (ids = block
ids) and read-only memory maps of the payload files.

Database work is async and done by services between forwards:

* ``await refresh()`` makes the in-process state equal the committed state (cheap when nothing
  changed: one aggregate query). Other processes' commits and deletions become visible here.
* ``add(block)`` (sync, during a forward) *stages* a block: it is searchable and fetchable at once
  under a provisional id (``>= PENDING_BASE``); ``await commit_pending(...)`` persists all staged
  blocks in one all-or-nothing write and returns {provisional id: block id};
  ``discard_pending()`` drops them.

Invariants: the committed part of the indexes holds exactly the representatives of the blocks in
``_blocks`` (the live rows as of the last refresh or own commit); every payload read is
checked against its row's crc32 the first time a block is fetched in this process.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from memllm.memory.faiss_index import BlockIndex
from memllm.memory.source import PROVISIONAL_BASE, pad_block
from memllm.memory.types import BlockLayout, FetchedBlocks, MemoryBlock
from memllm_storage.blockfile import PayloadReader, RecordView
from memllm_storage.checksums import combine, id_set_checksum
from memllm_storage.index_manager import IndexManager
from memllm_storage.models import MemoryBlockRow
from memllm_storage.owners import Owner

if TYPE_CHECKING:
    from memllm_storage.store import MemoryStore

log = logging.getLogger(__name__)

PENDING_BASE = PROVISIONAL_BASE  # provisional ids of staged blocks, reused; DB ids stay far below
VIEW_CACHE_BLOCKS = 16384  # record views kept per source (each a few hundred bytes; the data stays in the map)


@dataclass
class BlockEntry:
    """What the source knows of one committed block (a copy of its row)."""

    file: str
    offset: int
    length: int
    checksum: int
    token_start: int
    token_end: int
    n_reps: int
    document_id: int | None = None
    chunk_id: int | None = None
    message_id: int | None = None

    @classmethod
    def from_row(cls, row: MemoryBlockRow) -> BlockEntry:
        return cls(
            row.payload_file,
            row.payload_offset,
            row.payload_length,
            row.payload_checksum,
            row.token_start,
            row.token_end,
            row.n_representatives,
            row.document_id,
            row.chunk_id,
            row.message_id,
        )


class PersistentSource:
    """In-process view of one owner's committed blocks (see module docstring)."""

    def __init__(
        self,
        store: MemoryStore,
        owner: Owner,
        layout: BlockLayout,
        *,
        ivf_threshold: int = 200_000,
        checkpoint_fraction: float = 0.05,
        verify_payloads: bool = True,
    ) -> None:
        self.name = str(owner)
        self.owner = owner
        self.layout = layout
        self.directory: Path = owner.directory(store.data_dir)
        self.verify_payloads = verify_payloads
        self._store = store
        self._lock = threading.RLock()
        self._blocks: dict[int, BlockEntry] = {}
        self._readers: dict[str, PayloadReader] = {}
        self._verified: set[int] = set()
        # views of recently read records (a block is read once per memory layer of a search)
        self._views: OrderedDict[int, RecordView] = OrderedDict()
        self._fingerprint: tuple[int, int, int, str] | None = None
        self._vcount = 0  # representatives of committed blocks (what every layer's index holds)
        self._idsum = 0  # id_set_checksum of committed block ids
        self.indexes = IndexManager(self.directory, layout, ivf_threshold, checkpoint_fraction)
        self._pending: list[MemoryBlock] = []
        self._pending_index = self._new_pending_index()
        self.closed = False

    def _new_pending_index(self) -> list[BlockIndex]:
        return [BlockIndex(self.layout.search_dim, ivf_threshold=1 << 40) for _ in self.layout.layers]

    # ---- sync read path ------------------------------------------------------------------------
    def num_blocks(self) -> int:
        with self._lock:
            return len(self._blocks) + len(self._pending)

    def block_ids(self) -> np.ndarray:
        """Committed block ids known to this process, ascending."""
        with self._lock:
            return np.array(sorted(self._blocks), dtype=np.int64)

    def search(self, layer: int, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        slot = self.layout.layer_slot(layer)
        with self._lock:
            scores, ids = self.indexes.indexes[slot].search(queries, k)
            if not self._pending:
                return scores, ids
            ps, pi = self._pending_index[slot].search(queries, k)
        s = np.concatenate([scores, ps], axis=1)
        i = np.concatenate([ids, pi], axis=1)
        order = np.argsort(-s, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)

    def fetch(self, layer: int, block_ids: np.ndarray) -> FetchedBlocks:
        slot = self.layout.layer_slot(layer)
        ids = np.asarray(block_ids, dtype=np.int64).reshape(-1)
        lay = self.layout
        keys = np.zeros((len(ids), lay.n_kv_heads, lay.block_size, lay.head_dim), dtype=np.float16)
        values = np.zeros_like(keys)
        spans = np.zeros((len(ids), 2), dtype=np.int64)
        with self._lock:
            for j, bid in enumerate(ids.tolist()):
                if bid >= PENDING_BASE and bid - PENDING_BASE < len(self._pending):
                    blk = self._pending[bid - PENDING_BASE]
                    keys[j] = pad_block(np.asarray(blk.keys[slot], np.float16), lay.block_size)
                    values[j] = pad_block(np.asarray(blk.values[slot], np.float16), lay.block_size)
                    spans[j] = (blk.token_start, blk.token_end)
                    continue
                entry = self._blocks.get(bid)
                if entry is None:
                    raise KeyError(f"unknown block id {bid} in source {self.name!r}")
                k, v = self._record(bid, entry).layer_kv(slot)
                n = k.shape[1]
                keys[j, :, :n] = k
                values[j, :, :n] = v
                spans[j] = (entry.token_start, entry.token_end)
        return FetchedBlocks(keys, values, spans[:, 1] - spans[:, 0], spans)

    def spans(self, block_ids: np.ndarray) -> np.ndarray:
        with self._lock:
            out = []
            for bid in np.asarray(block_ids, dtype=np.int64).tolist():
                if bid >= PENDING_BASE:
                    blk = self._pending[bid - PENDING_BASE]
                    out.append((blk.token_start, blk.token_end))
                else:
                    e = self._blocks[bid]
                    out.append((e.token_start, e.token_end))
            return np.array(out, dtype=np.int64).reshape(-1, 2)

    def block_info(self, block_ids: np.ndarray) -> list[BlockEntry | None]:
        """Provenance of committed blocks (document, chunk, message, span); None if unknown."""
        with self._lock:
            return [self._blocks.get(int(b)) for b in np.asarray(block_ids).reshape(-1)]

    def _record(self, bid: int, entry: BlockEntry) -> RecordView:
        view = self._views.get(bid)
        if view is not None:
            self._views.move_to_end(bid)
            return view
        reader = self._reader(entry.file)
        verify = self.verify_payloads and bid not in self._verified
        view = reader.record(entry.offset, entry.length, entry.checksum if verify else None)
        if verify:
            self._verified.add(bid)
        self._views[bid] = view
        if len(self._views) > VIEW_CACHE_BLOCKS:
            self._views.popitem(last=False)
        return view

    def _reader(self, file: str) -> PayloadReader:
        reader = self._readers.get(file)
        if reader is None:
            reader = self._readers[file] = PayloadReader(self.directory / file)
        return reader

    # ---- staging (sync) ------------------------------------------------------------------------
    def add(self, block: MemoryBlock) -> int:
        """Stage ``block`` (searchable now, persisted by ``commit_pending``); returns a provisional id."""
        lay = self.layout
        if block.keys.shape[:2] != (lay.n_layers, lay.n_kv_heads) or block.keys.shape[3] != lay.head_dim:
            raise ValueError(f"block keys {block.keys.shape} do not fit layout {lay}")
        if block.length > lay.block_size or block.representatives.shape[2] != lay.search_dim:
            raise ValueError(f"block of {block.length} tokens / reps {block.representatives.shape} misfit {lay}")
        with self._lock:
            pid = PENDING_BASE + len(self._pending)
            self._pending.append(block)
            for slot in range(lay.n_layers):
                reps = np.asarray(block.representatives[slot], np.float32)
                self._pending_index[slot].add(np.full(len(reps), pid, np.int64), reps)
            return pid

    @property
    def pending(self) -> list[MemoryBlock]:
        return list(self._pending)

    def discard_pending(self) -> None:
        with self._lock:
            self._pending = []
            self._pending_index = self._new_pending_index()

    async def commit_pending(self, **provenance: Any) -> dict[int, int]:
        """Persist staged blocks in one all-or-nothing write; returns {provisional id: block id}.

        ``provenance``: keyword arguments of :meth:`memllm_storage.writer.OwnerWriter.add_blocks`
        (``document_id``, ``chunk_ids``, ``message_ids``). Staged blocks stay staged on failure.
        """
        with self._lock:
            blocks = list(self._pending)
        if not blocks:
            return {}
        async with self._store.writer(self.owner) as w:
            ids = await w.add_blocks(blocks, **provenance)
        with self._lock:
            del self._pending[: len(blocks)]
            rest = self._pending
            self.discard_pending()
            for blk in rest:
                self.add(blk)
        return {PENDING_BASE + i: bid for i, bid in enumerate(ids)}

    # ---- async sync-with-database ----------------------------------------------------------------
    async def refresh(self) -> bool:
        """Catch up with committed state; returns True if anything changed."""
        async with self._store.sessions() as session:
            return await self._store._sync_source(self, session)

    # ---- used by the store (caller holds the owner lock when writing) -----------------------------
    def _reps_of(self, block_ids: np.ndarray, slot: int) -> tuple[np.ndarray, np.ndarray]:
        ids_out, vecs = [], []
        for bid in np.asarray(block_ids, dtype=np.int64).tolist():
            e = self._blocks[bid]
            reps = self._reader(e.file).record(e.offset, e.length).representatives(slot)
            ids_out.append(np.full(len(reps), bid, np.int64))
            vecs.append(reps)
        if not vecs:
            return np.zeros(0, np.int64), np.zeros((0, self.layout.search_dim), np.float32)
        return np.concatenate(ids_out), np.concatenate(vecs)

    def _apply(
        self,
        added: list[tuple[int, BlockEntry]],
        removed: list[int],
        moved: list[tuple[int, BlockEntry]] = (),
    ) -> None:  # type: ignore[assignment]
        """Apply a committed delta to blocks and indexes (payloads of ``added`` must be readable)."""
        with self._lock:
            removed = [bid for bid in removed if bid in self._blocks]
            added = [(bid, e) for bid, e in added if bid not in self._blocks]
            if removed:
                self.indexes.remove(np.array(removed, np.int64))
                for bid in removed:
                    self._vcount -= self._blocks.pop(bid).n_reps
                    self._verified.discard(bid)
                    self._views.pop(bid, None)
                self._idsum = combine(self._idsum, removed=id_set_checksum(np.array(removed, np.int64)))
            for bid, entry in moved:
                self._blocks[bid] = entry
                self._verified.discard(bid)
                self._views.pop(bid, None)
            if added:
                for bid, entry in added:
                    self._blocks[bid] = entry
                    self._vcount += entry.n_reps
                ids = np.array([bid for bid, _ in added], np.int64)
                self._idsum = combine(self._idsum, added=id_set_checksum(ids))
                for slot in range(self.layout.n_layers):
                    vid, vecs = self._reps_of(ids, slot)
                    self.indexes.add(slot, vid, vecs)
            self._close_unused_readers()

    def _close_unused_readers(self) -> None:
        used = {e.file for e in self._blocks.values()}
        for name in list(self._readers):
            if name not in used:
                self._readers.pop(name).close()

    def _reset(self, entries: dict[int, BlockEntry]) -> None:
        with self._lock:
            self._blocks = dict(entries)
            self._verified.clear()
            self._views.clear()
            self._vcount = sum(e.n_reps for e in entries.values())
            self._idsum = id_set_checksum(np.fromiter(entries, np.int64, len(entries)))

    def committed_summary(self) -> tuple[int, int]:
        """(vector count, id-set checksum) of the committed blocks known here."""
        with self._lock:
            return self._vcount, self._idsum

    def close(self) -> None:
        """Forget everything in process (the owner was deleted or the store is closing)."""
        with self._lock:
            self.closed = True
            self._blocks = {}
            self._pending = []
            self.indexes = IndexManager(self.directory, self.layout, self.indexes.ivf_threshold)
            self._pending_index = self._new_pending_index()
            self._views.clear()
            for r in self._readers.values():
                r.close()
            self._readers = {}

"""On-disk FAISS index files: atomic save, verified load.

File layout: a 40-byte header (magic b"MLIX", version u16, memory layer u16, vector count u64,
id-set checksum u64, body length u64, body crc32 u32) followed by ``BlockIndex.to_bytes()``.

Saving writes ``<name>.tmp-<pid>``, fsyncs it, ``os.replace``s it over the old file and fsyncs the
directory, so a reader or a crash sees the old file or the new one, never a mix. Loading verifies
magic, length and crc32, then that the deserialised index holds the vector count and id set the
header claims; any failure raises :class:`IndexFileError` (callers rebuild from the database).
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import faiss
import numpy as np

from memllm.memory.faiss_index import BlockIndex
from memllm_storage.checksums import id_set_checksum
from memllm_storage.crashpoints import armed, crash_point, stop

MAGIC = b"MLIX"
VERSION = 1
HEADER = struct.Struct("<4sHHQQQI")


class IndexFileError(RuntimeError):
    """An index file is missing, truncated, corrupt, or disagrees with its own header."""


def index_ids(index: BlockIndex) -> np.ndarray:
    """The block id of every vector in ``index`` (one entry per representative)."""
    return faiss.vector_to_array(index._flat.id_map).astype(np.int64)


def index_summary(index: BlockIndex) -> tuple[int, int]:
    """(vector count, id-set checksum) of an index."""
    return index.ntotal, id_set_checksum(index_ids(index))


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_index(path: Path, index: BlockIndex, layer: int, summary: tuple[int, int] | None = None) -> None:
    """Atomically replace ``path`` with ``index`` (see module docstring)."""
    count, checksum = summary if summary is not None else index_summary(index)
    body = index.to_bytes()
    header = HEADER.pack(MAGIC, VERSION, layer, count, checksum, len(body), zlib.crc32(body) & 0xFFFFFFFF)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(header)
        if armed("index.mid_save"):
            f.write(body[: len(body) // 2])
            f.flush()
            os.fsync(f.fileno())
            stop("index.mid_save")
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    crash_point("index.before_replace")
    os.replace(tmp, path)
    fsync_dir(path.parent)


def load_index(path: Path, ivf_threshold: int, expect_layer: int | None = None) -> tuple[BlockIndex, int, int]:
    """Load and verify an index file; returns (index, vector count, id-set checksum)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IndexFileError(f"{path.name}: {exc.strerror or exc}") from exc
    if len(data) < HEADER.size:
        raise IndexFileError(f"{path.name}: truncated header")
    magic, version, layer, count, checksum, body_len, crc = HEADER.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise IndexFileError(f"{path.name}: bad magic/version")
    if expect_layer is not None and layer != expect_layer:
        raise IndexFileError(f"{path.name}: holds layer {layer}, expected {expect_layer}")
    body = memoryview(data)[HEADER.size :]
    if len(body) != body_len or (zlib.crc32(body) & 0xFFFFFFFF) != crc:
        raise IndexFileError(f"{path.name}: body length or crc32 mismatch (corrupt or partial file)")
    try:
        index = BlockIndex.from_bytes(bytes(body), ivf_threshold=ivf_threshold)
    except Exception as exc:  # faiss raises RuntimeError on garbage
        raise IndexFileError(f"{path.name}: cannot deserialise: {exc}") from exc
    actual = index_summary(index)
    if actual != (count, checksum):
        raise IndexFileError(f"{path.name}: content {actual} disagrees with header {(count, checksum)}")
    return index, count, checksum


def remove_temp_files(directory: Path) -> None:
    """Delete leftover ``*.tmp-*`` files of crashed saves (caller holds the owner lock)."""
    for p in directory.glob("*.tmp-*"):
        p.unlink(missing_ok=True)

"""Checksums used to check files and indexes against the database.

* :func:`payload_checksum`: crc32 of a block record's bytes (stored in ``memory_blocks``).
* :func:`id_set_checksum`: an order-independent checksum of a *set* of block ids: the sum, modulo
  2**63, of a 64-bit mix (splitmix64) of each distinct id. It can be updated incrementally
  (add on insert, subtract on delete) and computed from a FAISS id map with numpy, so an index can
  be compared with ``index_state`` without sorting or hashing row by row.
"""

from __future__ import annotations

import zlib

import numpy as np

MASK63 = (1 << 63) - 1


def payload_checksum(data: bytes | memoryview | np.ndarray) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


def _mix(ids: np.ndarray) -> np.ndarray:
    z = ids.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def id_set_checksum(ids: np.ndarray | list[int], *, distinct: bool = False) -> int:
    """Checksum of the set of ``ids`` (duplicates counted once unless ``distinct`` says they are)."""
    arr = np.asarray(ids, dtype=np.int64)
    if not distinct:
        arr = np.unique(arr)
    if arr.size == 0:
        return 0
    with np.errstate(over="ignore"):
        total = int(_mix(arr).sum(dtype=np.uint64))
    return total & MASK63


def combine(checksum: int, added: int = 0, removed: int = 0) -> int:
    """Update a set checksum: ``added``/``removed`` are checksums of disjoint id sets."""
    return (checksum + added - removed) & MASK63

"""Block payload records and the append-only files that hold them.

Record layout (little endian; every section starts at a 64-byte boundary from the record start,
padding is zero, the record length is a multiple of 64)::

    header   64 bytes: magic b"MLMB", version u16, dtype u8 (1 float16, 2 int8), pad u8,
             n_layers, n_kv_heads, head_dim, n_tokens, n_reps, search_dim (u32 each), length (u64)
    keys     (L, Hkv, n, D)  float16 | int8          pre-RoPE keys of the memory layers
    values   (L, Hkv, n, D)  float16 | int8
    kscale   (L, Hkv, n)     float32                 int8 only: per-row (token, head) scales
    vscale   (L, Hkv, n)     float32                 int8 only
    reps     (L, R, Hkv*D)   float32                 the vectors indexed by FAISS (for rebuilds)

Invariants of a payload file (one per owner and generation, ``payload-NNNNNN.bin``):

* It is only ever appended to, by the single writer holding the owner's lock, or truncated by that
  writer back to the end of the last committed record (bytes past it are orphans of a crashed or
  rolled-back write).
* A record is addressed by (offset, length) from its database row and verified against the row's
  crc32 (:func:`memllm_storage.checksums.payload_checksum`) before its first use in a process.
* Readers map the file read-only (``mmap``) and never read past the committed rows they know of,
  so a concurrent append is invisible to them until its rows commit and they refresh.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memllm.memory.types import MemoryBlock
from memllm_storage.checksums import payload_checksum
from memllm_storage.crashpoints import armed, crash_point, stop

MAGIC = b"MLMB"
VERSION = 1
ALIGN = 64
HEADER = struct.Struct("<4sHBBIIIIIIQ")
DTYPE_CODES = {"float16": 1, "int8": 2}
CODE_DTYPES = {v: k for k, v in DTYPE_CODES.items()}


class PayloadError(RuntimeError):
    """A payload record is missing, truncated, or fails its checksum."""


def _pad(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class RecordGeometry:
    """Sizes and section offsets of one record (from its header)."""

    dtype: str
    n_layers: int
    n_kv_heads: int
    head_dim: int
    n_tokens: int
    n_reps: int
    search_dim: int

    @property
    def kv_shape(self) -> tuple[int, int, int, int]:
        return (self.n_layers, self.n_kv_heads, self.n_tokens, self.head_dim)

    @property
    def _kv_bytes(self) -> int:
        return math.prod(self.kv_shape) * (1 if self.dtype == "int8" else 2)

    @property
    def _scale_bytes(self) -> int:
        return self.n_layers * self.n_kv_heads * self.n_tokens * 4 if self.dtype == "int8" else 0

    @property
    def offsets(self) -> dict[str, int]:
        off = {"keys": _pad(HEADER.size)}
        off["values"] = off["keys"] + _pad(self._kv_bytes)
        off["kscale"] = off["values"] + _pad(self._kv_bytes)
        off["vscale"] = off["kscale"] + _pad(self._scale_bytes)
        off["reps"] = off["vscale"] + _pad(self._scale_bytes)
        off["end"] = off["reps"] + _pad(self.n_layers * self.n_reps * self.search_dim * 4)
        return off

    @property
    def length(self) -> int:
        return self.offsets["end"]


def _quantize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float (..., D) -> int8 (..., D), float32 scales (...,): x ~= q * scale, |q| <= 127."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.abs(x).max(axis=-1) / 127.0
    safe = np.where(scale > 0, scale, 1.0)
    q = np.clip(np.rint(x / safe[..., None]), -127, 127).astype(np.int8)
    return q, scale.astype(np.float32)


def encode_block(block: MemoryBlock, dtype: str = "float16") -> bytes:
    """Serialise one block into a record (see module docstring)."""
    if dtype not in DTYPE_CODES:
        raise ValueError(f"payload dtype must be one of {sorted(DTYPE_CODES)}, got {dtype!r}")
    n_layers, hkv, n, d = block.keys.shape
    reps = np.ascontiguousarray(block.representatives, dtype=np.float32)
    geo = RecordGeometry(dtype, n_layers, hkv, d, n, reps.shape[1], reps.shape[2])
    off = geo.offsets
    buf = bytearray(geo.length)
    HEADER.pack_into(
        buf,
        0,
        MAGIC,
        VERSION,
        DTYPE_CODES[dtype],
        0,
        n_layers,
        hkv,
        d,
        n,
        reps.shape[1],
        reps.shape[2],
        geo.length,
    )
    if dtype == "float16":
        k = np.ascontiguousarray(block.keys, dtype=np.float16).tobytes()
        v = np.ascontiguousarray(block.values, dtype=np.float16).tobytes()
        buf[off["keys"] : off["keys"] + len(k)] = k
        buf[off["values"] : off["values"] + len(v)] = v
    else:
        kq, ks = _quantize(block.keys)
        vq, vs = _quantize(block.values)
        for name, arr in (("keys", kq), ("values", vq), ("kscale", ks), ("vscale", vs)):
            raw = np.ascontiguousarray(arr).tobytes()
            buf[off[name] : off[name] + len(raw)] = raw
    raw = reps.tobytes()
    buf[off["reps"] : off["reps"] + len(raw)] = raw
    return bytes(buf)


def read_geometry(buf: memoryview | bytes, offset: int = 0) -> RecordGeometry:
    magic, version, code, _, n_layers, hkv, d, n, r, sd, length = HEADER.unpack_from(buf, offset)
    if magic != MAGIC or version != VERSION or code not in CODE_DTYPES:
        raise PayloadError(f"not a block record at offset {offset} (magic {magic!r}, version {version})")
    geo = RecordGeometry(CODE_DTYPES[code], n_layers, hkv, d, n, r, sd)
    if geo.length != length:
        raise PayloadError(f"record at offset {offset}: header length {length} != computed {geo.length}")
    return geo


class RecordView:
    """Arrays of one record, viewed (not copied) from a buffer such as a memory map."""

    def __init__(self, buf: memoryview | bytes, offset: int = 0) -> None:
        self.geo = read_geometry(buf, offset)
        self._buf = buf
        self._base = offset
        self._offsets = self.geo.offsets  # computed once: a view is read once per layer

    def _arr(self, section: str, dtype: type, shape: tuple[int, ...]) -> np.ndarray:
        return np.frombuffer(
            self._buf, dtype=dtype, count=math.prod(shape), offset=self._base + self._offsets[section]
        ).reshape(shape)

    def layer_kv(self, slot: int) -> tuple[np.ndarray, np.ndarray]:
        """Keys and values of memory-layer slot ``slot``: (Hkv, n, D) float16 each."""
        g = self.geo
        if g.dtype == "float16":
            k = self._arr("keys", np.float16, g.kv_shape)[slot]
            v = self._arr("values", np.float16, g.kv_shape)[slot]
            return k, v
        kq = self._arr("keys", np.int8, g.kv_shape)[slot]
        vq = self._arr("values", np.int8, g.kv_shape)[slot]
        ks = self._arr("kscale", np.float32, g.kv_shape[:3])[slot]
        vs = self._arr("vscale", np.float32, g.kv_shape[:3])[slot]
        return ((kq * ks[..., None]).astype(np.float16), (vq * vs[..., None]).astype(np.float16))

    def representatives(self, slot: int) -> np.ndarray:
        """(R, Hkv*D) float32 representatives of memory-layer slot ``slot``."""
        g = self.geo
        return self._arr("reps", np.float32, (g.n_layers, g.n_reps, g.search_dim))[slot]


class PayloadWriter:
    """Appends records to one payload file; the caller holds the owner's write lock.

    ``append`` returns (offset, length, crc32) per record; bytes reach the disk at ``sync``.
    ``rollback`` truncates back to the size the file had when the writer was opened.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self.start_size = os.fstat(self._fd).st_size
        self.size = self.start_size

    def append(self, records: list[bytes]) -> list[tuple[int, int, int]]:
        out = []
        for rec in records:
            crash_point("payload.before_append")
            if armed("payload.mid_record"):
                os.pwrite(self._fd, rec[: len(rec) // 2], self.size)
                os.fsync(self._fd)
                stop("payload.mid_record")
            os.pwrite(self._fd, rec, self.size)
            out.append((self.size, len(rec), payload_checksum(rec)))
            self.size += len(rec)
        return out

    def sync(self) -> None:
        os.fsync(self._fd)

    def truncate(self, size: int) -> None:
        os.ftruncate(self._fd, size)
        os.fsync(self._fd)
        self.size = size

    def rollback(self) -> None:
        self.truncate(self.start_size)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class PayloadReader:
    """Read-only memory map of one payload file, remapped when it grows past the mapped size.

    Thread-safe; ``record`` views stay valid while the reader is open (the file is never
    truncated below a committed record, and a compacted file is replaced by a new name).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file = open(path, "rb")  # noqa: SIM115 (kept open for the map's lifetime)
        self._map: mmap.mmap | None = None
        self._old_maps: list[mmap.mmap] = []  # maps still referenced by arrays handed out
        self._size = 0
        self._remap()

    def _remap(self) -> None:
        size = os.fstat(self._file.fileno()).st_size
        if size and size != self._size:
            if self._map is not None:
                self._old_maps.append(self._map)
            self._map = mmap.mmap(self._file.fileno(), size, access=mmap.ACCESS_READ)
            self._size = size

    def record(self, offset: int, length: int, checksum: int | None = None) -> RecordView:
        """View of the record at ``offset``; verified against ``checksum`` when given."""
        with self._lock:
            if offset + length > self._size:
                self._remap()
            if offset + length > self._size or self._map is None:
                raise PayloadError(f"{self.path.name}: record [{offset}, {offset + length}) past end ({self._size})")
            buf = memoryview(self._map)[offset : offset + length]
        if checksum is not None and payload_checksum(buf) != checksum:
            raise PayloadError(f"{self.path.name}: checksum mismatch for record at offset {offset}")
        view = RecordView(buf)
        if view.geo.length != length:
            raise PayloadError(f"{self.path.name}: record at {offset} has length {view.geo.length}, row says {length}")
        return view

    def close(self) -> None:
        # Maps are closed by garbage collection once no exported array refers to them.
        self._map = None
        self._old_maps.clear()
        self._file.close()

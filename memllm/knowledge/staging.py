"""Ingestions in flight: the text each one is reading, and who is reading it, kept on disk.

A new document's row is ``pending`` / ``parsing`` / ``encoding`` while it is read, and its text
reaches the database only with its chunks, in the one commit that makes it ``ready``. If the process
dies in between (SIGKILL, a crash, a stop), the row would stay in that status for ever and the text
would be gone. So, per document being read, under ``<data_dir>/ingest/``:

* ``doc-<id>.json``: the text and how it came (name, media type, metadata), written atomically
  before the model starts;
* ``doc-<id>.lock``: an exclusive ``flock`` held by the reading process for as long as it reads.
  The kernel drops it when that process dies, whatever way it dies.

A row in a reading status whose lock nobody holds was interrupted: :func:`interrupted_ids` finds
them, the service marks them ``error`` with the reason, and :meth:`IngestStaging.load` gives the
text back for a retry. Both files go once the document is ``ready`` (or refused as a bad document,
which a retry would not change).

Locks are per open file, so a check from the reading process itself also sees the lock as held.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
from collections.abc import AsyncIterator, Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

READING_STATUSES = ("pending", "parsing", "encoding")
_STAGED_RE = re.compile(r"^doc-(\d+)\.(?:json|lock)$")


@dataclass(frozen=True)
class StagedText:
    """What a retry needs to read a document again."""

    name: str
    text: str
    media_type: str
    meta: dict[str, Any]


class IngestStaging:
    """The files of ingestions in flight under ``root`` (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _text_path(self, doc_id: int) -> Path:
        return self.root / f"doc-{int(doc_id)}.json"

    def _lock_path(self, doc_id: int) -> Path:
        return self.root / f"doc-{int(doc_id)}.lock"

    def stage(self, doc_id: int, staged: StagedText) -> None:
        """Keep ``staged`` for ``doc_id`` (written to a temporary file, fsynced, renamed)."""
        self.root.mkdir(parents=True, exist_ok=True)
        final = self._text_path(doc_id)
        tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
        body = {"name": staged.name, "text": staged.text, "media_type": staged.media_type, "meta": staged.meta}
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(body, f, ensure_ascii=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)

    def load(self, doc_id: int) -> StagedText | None:
        """The staged text of ``doc_id``, or None when none was kept (or it cannot be read)."""
        try:
            body = json.loads(self._text_path(doc_id).read_text(encoding="utf-8"))
            return StagedText(body["name"], body["text"], body.get("media_type", "text/plain"), body.get("meta") or {})
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def has_text(self, doc_id: int) -> bool:
        return self._text_path(doc_id).is_file()

    def drop(self, doc_id: int) -> None:
        """Forget ``doc_id``'s text and lock file (after it is ready, or beyond a retry's help)."""
        for path in (self._text_path(doc_id), self._lock_path(doc_id)):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    @contextlib.contextmanager
    def reading(self, doc_id: int) -> Iterator[None]:
        """Hold ``doc_id``'s lock while the body runs; raises ``BlockingIOError`` if another reader
        holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self._lock_path(doc_id), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def staged_ids(self) -> set[int]:
        """Ids of the documents that have a kept text or a lock file here."""
        if not self.root.is_dir():
            return set()
        return {int(m.group(1)) for p in self.root.iterdir() if (m := _STAGED_RE.match(p.name))}

    def drop_orphans(self, live_ids: Iterable[int]) -> list[int]:
        """Drop the files of documents not in ``live_ids`` that nobody reads (a delete that
        committed, then crashed before its cleanup); returns their ids."""
        live = set(live_ids)
        gone = sorted(i for i in self.staged_ids() - live if not self.is_being_read(i))
        for doc_id in gone:
            self.drop(doc_id)
        return gone

    def is_being_read(self, doc_id: int) -> bool:
        """Whether some live process holds ``doc_id``'s lock (this one included)."""
        try:
            fd = os.open(self._lock_path(doc_id), os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)


class KeyedLocks:
    """One asyncio lock per key (here: a document name of a knowledge base), kept only while
    someone holds or waits for it. Serializes the ingestions of one name within a process."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}

    def busy(self, key: Hashable) -> bool:
        """Whether someone holds (or waits for) ``key``."""
        return key in self._locks

    @contextlib.asynccontextmanager
    async def hold(self, key: Hashable) -> AsyncIterator[None]:
        """Hold ``key``'s lock for the body (waiting for the earlier holders, first come first served)."""
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


def interrupted_ids(staging: IngestStaging, rows: Iterable[tuple[int, str]]) -> list[int]:
    """Ids among ``rows`` ((id, status) of documents) in a reading status that nobody is reading."""
    return [doc_id for doc_id, status in rows if status in READING_STATUSES and not staging.is_being_read(doc_id)]


def interrupted_message(retryable: bool) -> str:
    how = "retry it" if retryable else "its text was not kept: ingest it again"
    return f"interrupted: the ingestion stopped before the document was ready (the process stopped or crashed); {how}"

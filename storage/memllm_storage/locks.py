"""Locks that serialize writers of one owner, within a process and across processes.

Order (always the same, so no deadlock): the in-process ``asyncio.Lock`` of the owner, then the
owner's file lock (``fcntl.flock`` on ``<owner dir>/owner.lock``, protecting payload and index
files of a shared data directory), then, inside the writer's database transaction, the
PostgreSQL advisory transaction lock of the owner (see :mod:`memllm_storage.store`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
from collections.abc import AsyncIterator
from pathlib import Path


class FileLock:
    """An exclusive ``flock`` on a file; blocking acquisition runs in a worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1

    def _acquire_blocking(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    async def acquire(self) -> None:
        await asyncio.to_thread(self._acquire_blocking)

    def release(self) -> None:
        if self._fd >= 0:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = -1


class OwnerLocks:
    """Per-owner in-process locks plus the owner's file lock."""

    def __init__(self) -> None:
        self._local: dict[str, asyncio.Lock] = {}

    @contextlib.asynccontextmanager
    async def hold(self, key: str, lock_file: Path) -> AsyncIterator[None]:
        local = self._local.setdefault(key, asyncio.Lock())
        async with local:
            flock = FileLock(lock_file)
            await flock.acquire()
            try:
                yield
            finally:
                flock.release()

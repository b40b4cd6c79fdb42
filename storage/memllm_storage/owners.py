"""Owners of memory: a knowledge base or a chat session.

An :class:`Owner` names where blocks live: rows with ``knowledge_base_id`` or ``session_id``
equal to its id, and the directory ``<data_dir>/memory/<kind>-<id>/`` with its payload files,
index files and lock file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from memllm_storage import models

OwnerKind = Literal["kb", "session"]


@dataclass(frozen=True, order=True)
class Owner:
    kind: OwnerKind
    id: int

    def __post_init__(self) -> None:
        if self.kind not in ("kb", "session"):
            raise ValueError(f"owner kind must be 'kb' or 'session', got {self.kind!r}")

    @classmethod
    def kb(cls, kb_id: int) -> Owner:
        return cls("kb", int(kb_id))

    @classmethod
    def session(cls, session_id: int) -> Owner:
        return cls("session", int(session_id))

    def __str__(self) -> str:
        return f"{self.kind}-{self.id}"

    @property
    def column(self) -> str:
        """The owner column of ``memory_blocks`` / ``index_state``."""
        return "knowledge_base_id" if self.kind == "kb" else "session_id"

    @property
    def row_model(self) -> type[models.KnowledgeBase] | type[models.ChatSession]:
        return models.KnowledgeBase if self.kind == "kb" else models.ChatSession

    def owner_values(self) -> dict[str, int | None]:
        """Column values that attach a block / index-state row to this owner."""
        return {
            "knowledge_base_id": self.id if self.kind == "kb" else None,
            "session_id": self.id if self.kind == "session" else None,
        }

    def directory(self, data_dir: Path) -> Path:
        return Path(data_dir) / "memory" / str(self)

    @property
    def lock_key(self) -> int:
        """A stable signed 64-bit key for PostgreSQL advisory locks."""
        digest = hashlib.blake2b(f"memllm-owner:{self}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big", signed=True)

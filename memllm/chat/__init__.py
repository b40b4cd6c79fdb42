"""Chat sessions that remember every turn through kNN memory (see README.md in this folder)."""

from memllm.chat.service import (
    ChatError,
    ChatService,
    Citation,
    MessageInfo,
    SessionInfo,
    SessionNotFoundError,
    TraceEntry,
    Turn,
    TurnResult,
)

__all__ = [
    "ChatError",
    "ChatService",
    "Citation",
    "MessageInfo",
    "SessionInfo",
    "SessionNotFoundError",
    "TraceEntry",
    "Turn",
    "TurnResult",
]

"""Tenant checks: a knowledge base or session of another tenant is reported as not found."""

from __future__ import annotations

from typing import Any

from memllm_api.auth import Caller
from memllm_api.errors import ApiError

MAX_ID = 2**63 - 1  # ids are int64 in every database; larger numbers name nothing


async def get_row(core: Any, model: type, row_id: int) -> Any:
    """The row with ``row_id``, or None (also for ids outside the int64 range)."""
    if not 0 < row_id <= MAX_ID:
        return None
    async with core.store.sessions() as db:
        return await db.get(model, row_id)


async def owned_kb(core: Any, caller: Caller, kb_id: int) -> Any:
    """The knowledge base row ``kb_id`` if the caller's tenant owns it, else 404."""
    from memllm_storage.models import KnowledgeBase

    row = await get_row(core, KnowledgeBase, kb_id)
    if row is None or row.tenant_id != caller.tenant_id:
        raise ApiError(404, f"knowledge base {kb_id} not found", "kb_not_found")
    return row


async def owned_session(core: Any, caller: Caller, session_id: int) -> Any:
    """The session's info if the caller's tenant owns it, else 404."""
    from memllm_storage.models import ChatSession

    row = await get_row(core, ChatSession, session_id)
    if row is None or row.tenant_id != caller.tenant_id:
        raise ApiError(404, f"session {session_id} not found", "session_not_found")
    return await core.chat.get(session_id)


async def owned_kb_ids(core: Any, caller: Caller, kb_ids: list[int] | None) -> list[int]:
    """Validates every id in ``kb_ids`` (404 for any the caller does not own)."""
    for kb_id in kb_ids or []:
        await owned_kb(core, caller, kb_id)
    return list(dict.fromkeys(kb_ids or []))

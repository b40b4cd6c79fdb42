"""Chat sessions: persistent memory of every turn; post a turn (streamed or not), page the history."""

from __future__ import annotations

import secrets
from typing import Annotated, Any

from litestar import Controller, Request, Response, delete, get, post
from litestar.params import Parameter

from memllm.sampling import SamplingParams
from memllm_api.auth import Caller
from memllm_api.core import ready_core
from memllm_api.errors import ERROR_RESPONSES, ApiError
from memllm_api.generation import TurnGeneration
from memllm_api.ownership import owned_kb_ids, owned_session
from memllm_api.schemas import CreateSession, PostMessage
from memllm_api.sse import native_answer, streaming_post


def session_json(info: Any) -> dict[str, Any]:
    return {
        "id": info.id,
        "name": info.name,
        "kb_ids": info.kb_ids,
        "messages": info.message_count,
        "tokens": info.token_count,
        "created_at": info.created_at.isoformat() if info.created_at else None,
        "updated_at": info.updated_at.isoformat() if info.updated_at else None,
    }


def message_json(m: Any) -> dict[str, Any]:
    return {
        "id": m.id,
        "ordinal": m.ordinal,
        "role": m.role,
        "content": m.content,
        "created_at": m.created_at.isoformat() if m.created_at else None,
    }


class SessionController(Controller):
    path = "/api/sessions"
    tags = ("sessions",)

    @post("/", status_code=201, summary="Create a session", responses=ERROR_RESPONSES)
    async def create(self, request: Request, caller: Caller, data: CreateSession) -> dict[str, Any]:
        core = ready_core(request)
        name = f"chat-{secrets.token_hex(4)}" if data.name is None else data.name.strip()
        if not name:
            raise ApiError(400, "name: a session name must not be blank (leave it out for one)", "invalid_name", "name")
        kb_ids = await owned_kb_ids(core, caller, data.kb_ids)
        info = await core.chat.create(name, system=data.system, kb_ids=kb_ids, tenant_id=caller.tenant_id)
        return session_json(info)

    @get("/", summary="List sessions", responses=ERROR_RESPONSES)
    async def list_sessions(self, request: Request, caller: Caller) -> dict[str, Any]:
        core = ready_core(request)
        return {"data": [session_json(i) for i in await core.chat.list(caller.tenant_id)]}

    @get("/{session_id:int}", summary="Get a session", responses=ERROR_RESPONSES)
    async def get_session(self, request: Request, caller: Caller, session_id: int) -> dict[str, Any]:
        return session_json(await owned_session(ready_core(request), caller, session_id))

    @delete("/{session_id:int}", status_code=204, summary="Delete a session and its memory", responses=ERROR_RESPONSES)
    async def delete_session(self, request: Request, caller: Caller, session_id: int) -> None:
        core = ready_core(request)
        await owned_session(core, caller, session_id)
        await core.chat.delete(session_id)

    @get("/{session_id:int}/export", summary="Export a session as JSON", responses=ERROR_RESPONSES)
    async def export(self, request: Request, caller: Caller, session_id: int) -> dict[str, Any]:
        core = ready_core(request)
        await owned_session(core, caller, session_id)
        return await core.chat.export(session_id)

    @get("/{session_id:int}/messages", summary="A page of the history, oldest first", responses=ERROR_RESPONSES)
    async def messages(
        self,
        request: Request,
        caller: Caller,
        session_id: int,
        limit: Annotated[int, Parameter(ge=1, le=500)] = 50,
        before: Annotated[
            int | None, Parameter(ge=0, le=2**63 - 1, description="only messages with ordinal < before")
        ] = None,
    ) -> dict[str, Any]:
        core = ready_core(request)
        await owned_session(core, caller, session_id)
        page = await core.chat.history(session_id, limit=limit + 1, before=before)
        has_more = len(page) > limit
        page = page[-limit:]
        return {"data": [message_json(m) for m in page], "has_more": has_more}

    @streaming_post("/{session_id:int}/messages", "Post a user turn; the reply streams with stream=true")
    async def post_message(self, request: Request, caller: Caller, session_id: int, data: PostMessage) -> Response:
        core = ready_core(request)
        await owned_session(core, caller, session_id)
        from memllm_api.routes.openai import check_prompt, check_prompt_chars

        check_prompt_chars(core, len(data.content), "content")
        check_prompt(core, len(core.engine.encode(data.content)))
        params = SamplingParams(max_tokens=core.api.output_tokens(data.max_tokens), temperature=data.temperature)
        gen = TurnGeneration(core, session_id, data.content, params)

        def message(o) -> dict[str, Any]:
            return {"message": {"id": o.message_id, "role": "assistant", "content": o.text}}

        return await native_answer(gen, data.stream, message)

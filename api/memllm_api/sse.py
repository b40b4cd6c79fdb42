"""Server-sent events: one ``data: {json}`` event per frame, ``data: [DONE]`` at the end.

The framing is Litestar's :class:`~litestar.response.ServerSentEvent` (lines end in CRLF, which the
SSE specification, the openai client and the web page all read); what is ours is the frames' JSON,
the error frame and the closing ``[DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema
from litestar.response import ServerSentEvent

DONE = "[DONE]"


def _json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


async def event_data(frames: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Each frame's JSON (one event's data); a failure midway becomes one ``{"type": "error",
    "error": {...}}`` frame (the shape the openai client raises from), and every stream ends with
    ``[DONE]``."""
    from memllm_api.errors import as_api_error, error_body

    try:
        async for frame in frames:
            yield _json(frame)
    except Exception as exc:
        err = as_api_error(exc)
        yield _json({"type": "error", **error_body(err.status, err.message, err.code, err.param)})
    yield DONE


def sse_response(frames: AsyncIterator[dict[str, Any]]) -> ServerSentEvent:
    """The frames as a ``text/event-stream`` response (no caching, no proxy buffering)."""
    return ServerSentEvent(event_data(frames))


@dataclass
class StreamingOperation(Operation):
    """The OpenAPI operation of a route that answers JSON, or server-sent events with ``stream: true``
    (Litestar documents one content type per status; this adds ``text/event-stream`` to 200)."""

    def __post_init__(self) -> None:
        ok = (self.responses or {}).get("200")
        if isinstance(ok, OpenAPIResponse):
            ok.content = dict(ok.content or {})
            event = Schema(
                type=OpenAPIType.OBJECT,
                description="one server-sent event: `data` holds a JSON object, or `[DONE]` at the end",
                properties={"data": Schema(type=OpenAPIType.STRING), "event": Schema(type=OpenAPIType.STRING)},
            )
            ok.content["text/event-stream"] = OpenAPIMediaType(schema=event)


def streaming_post(path: str, summary: str) -> Any:
    """``@post`` for a route that answers JSON, or SSE with ``stream: true`` (200, the shared
    error responses, both content types documented)."""
    from litestar import post

    from memllm_api.errors import ERROR_RESPONSES

    return post(path, status_code=200, summary=summary, operation_class=StreamingOperation, responses=ERROR_RESPONSES)


async def native_answer(gen: Any, stream: bool, fields: Callable[[Any], dict[str, Any]]) -> Any:
    """A native answer (docs/api-contract.md): ``fields(outcome)`` plus sources, memory trace,
    usage and finish reason; as JSON, or (``stream``) ``delta`` events then one ``done`` event."""
    from litestar import Response

    def result(o: Any) -> dict[str, Any]:
        common = {"memory_trace": o.memory_trace, "usage": o.usage, "finish_reason": o.finish_reason}
        return {**fields(o), "sources": o.sources, **common}

    if not stream:
        return Response(result(await gen.collect()))

    async def frames():
        async for piece in gen.stream():
            yield {"type": "delta", "text": piece}
        yield {"type": "done", **result(gen.outcome)}

    return sse_response(frames())

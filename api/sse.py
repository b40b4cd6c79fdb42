"""Server-sent events: ``data: {json}\\n\\n`` frames, ``data: [DONE]`` at the end."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from litestar.openapi.spec import OpenAPIMediaType, OpenAPIResponse, OpenAPIType, Operation, Schema

DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def event(data: Any) -> bytes:
    return b"data: " + json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def stream_events(frames: AsyncIterator[dict[str, Any]]) -> AsyncIterator[bytes]:
    """Frames as SSE; a failure midway becomes one ``{"type": "error", "error": {...}}`` frame
    (the shape the openai client raises from), and every stream ends with ``[DONE]``."""
    from api.errors import as_api_error, error_body

    try:
        async for frame in frames:
            yield event(frame)
    except Exception as exc:
        err = as_api_error(exc)
        yield event({"type": "error", **error_body(err.status, err.message, err.code, err.param)})
    yield DONE


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

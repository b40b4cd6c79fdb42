"""One error shape for every failure: OpenAI's ``{"error": {"message", "type", "code", "param"}}``.

Handlers turn the domain errors of the services into 4xx answers; anything unexpected is logged and
answered 500 in the same shape (the tests hold that no input reaches that path).
"""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from memllm.chat.service import ChatError, SessionConflictError, SessionNotFoundError
from memllm.knowledge.parsing import BadDocumentError
from memllm.knowledge.service import KnowledgeError
from memllm_storage.repositories import NotFoundError

log = logging.getLogger("memllm.api")

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    415: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


class ApiError(Exception):
    """A request the API refuses: ``status`` (4xx/503), a message for people, a stable ``code``."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers: dict[str, str] = {}


def error_body(status: int, message: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "code": code,
            "param": param,
        }
    }


def as_api_error(exc: BaseException) -> ApiError:
    """The API's view of any exception (used by handlers and mid-stream)."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, (SessionNotFoundError, NotFoundError)):
        return ApiError(404, str(exc), "not_found")
    if isinstance(exc, SessionConflictError):  # another process committed to the session: retry
        return ApiError(409, str(exc), "conflict")
    if isinstance(exc, (KnowledgeError, ChatError, BadDocumentError)):
        return ApiError(400, str(exc), "bad_request")
    if isinstance(exc, ValidationException):
        return ApiError(400, _validation_message(exc), "invalid_body")
    if isinstance(exc, HTTPException):
        err = ApiError(exc.status_code, str(exc.detail), _http_code(exc.status_code))
        err.headers = dict(exc.headers or {})
        return err
    if isinstance(exc, RecursionError):  # a JSON body nested thousands of levels (the decoder recurses)
        return ApiError(400, "invalid request: the body is nested too deeply", "too_deep")
    log.exception("unexpected error", exc_info=exc)
    return ApiError(500, "internal error (logged on the server)", "internal_error")


def _http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed", 413: "too_large", 415: "unsupported_media_type"}.get(
        status, "http_error"
    )


def _validation_message(exc: ValidationException) -> str:
    extra = exc.extra
    if isinstance(extra, list) and extra:
        parts = []
        for item in extra[:5]:
            if isinstance(item, dict):
                where = item.get("key") or item.get("source") or ""
                parts.append(f"{where}: {item.get('message', '')}".strip(": "))
        if parts:
            return "invalid request: " + "; ".join(parts)
    return f"invalid request: {exc.detail}"


def handle_exception(_request: Request, exc: Exception) -> Response:
    err = as_api_error(exc)
    status = err.status if err.status >= 400 else 500
    return Response(error_body(status, err.message, err.code, err.param), status_code=status, headers=err.headers)


def documented_errors() -> dict[int, Any]:
    """The error responses every route documents in the OpenAPI schema (all in one shape)."""
    from litestar.openapi import ResponseSpec

    from memllm_api.schemas import ErrorResponse

    described = {
        400: "invalid request",
        401: "missing or invalid API key",
        404: "not found (or owned by another tenant)",
        409: "conflict",
        413: "too large",
        415: "unsupported content type",
        429: "rate limit exceeded",
        503: "the model is still loading",
    }
    return {code: ResponseSpec(data_container=ErrorResponse, description=text) for code, text in described.items()}


ERROR_RESPONSES = documented_errors()

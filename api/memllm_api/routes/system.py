"""Health, metrics and the web page."""

from __future__ import annotations

from pathlib import Path

from litestar import Request, Response, get
from litestar.response import File

from memllm_api.core import get_core

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


@get("/health", tags=["system"], summary="503 while the model loads, then 200")
async def health(request: Request) -> Response:
    core = get_core(request)
    if core.ready.is_set():
        return Response({"status": "ok", "model": core.model_name})
    body = {"status": "error" if core.load_error else "loading", "error": core.load_error}
    return Response(body, status_code=503)


@get("/metrics", tags=["system"], summary="Prometheus metrics", media_type="text/plain; version=0.0.4")
async def metrics(request: Request) -> Response:
    core = get_core(request)
    return Response(core.metrics.render(core), media_type="text/plain; version=0.0.4; charset=utf-8")


@get("/", include_in_schema=False)
async def index() -> File:
    return File(STATIC_DIR / "index.html", content_disposition_type="inline", media_type="text/html")

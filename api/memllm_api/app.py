"""The app factory: ``create_app(settings, api_settings)`` -> a Litestar ASGI app.

Process-wide objects (model, storage, services, scheduler) are made once in the lifespan
(api/memllm_api/core.py); handlers are thin and reach them through the request. Every error answers in
OpenAI's ``{"error": {...}}`` shape (api/memllm_api/errors.py). App-wide guards
(api/memllm_api/guards.py) refuse foreign hosts, cross-site and proxied requests and non-JSON bodies.
"""

from __future__ import annotations

from importlib.metadata import version

from litestar import Litestar
from litestar.di import Provide
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin
from litestar.static_files import create_static_files_router

from memllm.settings import Settings, get_settings
from memllm_api.auth import RateLimiter, provide_caller
from memllm_api.config import ApiSettings
from memllm_api.core import Core, lifespan_for
from memllm_api.errors import handle_exception
from memllm_api.guards import metrics_guard, network_guard
from memllm_api.metrics import Metrics, MetricsMiddleware
from memllm_api.routes.knowledge import KnowledgeController
from memllm_api.routes.openai import OpenAIController
from memllm_api.routes.sessions import SessionController
from memllm_api.routes.system import STATIC_DIR, health, index, metrics


def create_app(settings: Settings | None = None, api: ApiSettings | None = None) -> Litestar:
    settings = settings or get_settings()
    api = api or ApiSettings.from_env()
    core = Core(settings, api)
    core.metrics = Metrics()
    app = Litestar(
        route_handlers=[
            health,
            metrics,
            index,
            create_static_files_router(path="/static", directories=[STATIC_DIR], include_in_schema=False),
            OpenAIController,
            KnowledgeController,
            SessionController,
        ],
        dependencies={"caller": Provide(provide_caller)},
        guards=[network_guard, metrics_guard],  # api/memllm_api/guards.py: hosts, proxies, cross-site, types
        lifespan=[lifespan_for(core)],
        exception_handlers={Exception: handle_exception},
        middleware=[DefineMiddleware(MetricsMiddleware, metrics=core.metrics)],
        openapi_config=OpenAPIConfig(
            title="memllm",
            version=version("memllm"),
            description="A language model with kNN memory: OpenAI-compatible chat, knowledge bases, sessions.",
            path="/schema",
            render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
        ),
        request_max_body_size=api.max_upload_bytes + 1024 * 1024,
        debug=False,
        logging_config=None,  # the CLI configures logging (MEMLLM_LOG_LEVEL, -v); Litestar's would set INFO
    )
    app.state.core = core
    app.state.rate_limiter = RateLimiter(api.rate_limit_per_minute)
    return app

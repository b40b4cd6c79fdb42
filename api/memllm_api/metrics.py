"""Prometheus metrics of one server (its own registry, so several apps can live in one process).

Requests and latency by route template, time to first token, generated tokens, queue depth and
batch size of the scheduler, memory blocks by owner kind and kNN search latency. ``GET /metrics``
renders them in the text exposition format. No label names a tenant, a knowledge base or a session
(any tenant's key may read them when auth is on): routes are templates, memory is summed by kind.
"""

from __future__ import annotations

import time
from typing import Any

from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("memllm_http_requests", "HTTP requests", ["method", "route", "status"], registry=r)
        self.latency = Histogram(
            "memllm_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "memllm_time_to_first_token_seconds",
            "time to first generated token",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter("memllm_generated_tokens", "tokens generated", ["endpoint"], registry=r)
        self.prompt_tokens = Counter("memllm_prompt_tokens", "prompt tokens read", ["endpoint"], registry=r)
        self.tokens_per_second = Histogram(
            "memllm_stream_tokens_per_second",
            "decode speed of one request",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200),
            registry=r,
        )
        self.queue_depth = Gauge("memllm_scheduler_queue_depth", "requests waiting for the model", registry=r)
        self.batch_size = Gauge("memllm_scheduler_batch_size", "streams in the current decode batch", registry=r)
        self.step_batch = Histogram(
            "memllm_scheduler_step_batch_size",
            "streams per decode step",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
            registry=r,
        )
        self.step_seconds = Histogram(
            "memllm_scheduler_step_seconds", "time of one batched decode step", buckets=LATENCY_BUCKETS, registry=r
        )
        self.model_threads = Gauge("memllm_model_threads", "intra-op threads of the model thread", registry=r)
        self.active_streams = Gauge("memllm_scheduler_active_streams", "streams being generated", registry=r)
        self.jobs = Gauge("memllm_scheduler_jobs", "generation jobs since start, by outcome", ["state"], registry=r)
        self.decode_steps = Gauge("memllm_scheduler_decode_steps", "batched decode steps since start", registry=r)
        self.memory_blocks = Gauge(
            "memllm_memory_blocks", "memory blocks, summed by owner kind (kb, session)", ["kind"], registry=r
        )
        self.knn_latency = Histogram(
            "memllm_knn_search_seconds",
            "kNN search latency (one layer, one search)",
            buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1),
            registry=r,
        )
        self.ingest_tokens = Counter("memllm_ingested_tokens", "document tokens ingested", registry=r)

    def observe_step(self, batch_size: int, seconds: float) -> None:
        """The scheduler's ``on_step`` hook (runs on the model thread; quick)."""
        self.step_batch.observe(batch_size)
        self.step_seconds.observe(seconds)

    def render(self, core: Any) -> bytes:
        self._refresh(core)
        return generate_latest(self.registry)

    def _refresh(self, core: Any) -> None:
        """Gauges read at scrape time from the live objects."""
        scheduler = getattr(core, "scheduler", None)
        if scheduler is not None:
            stats = scheduler.stats()
            self.queue_depth.set(stats.queued)
            self.batch_size.set(stats.batch_size)
            self.active_streams.set(stats.running + stats.prefilling)
            for state in ("submitted", "completed", "cancelled", "failed"):
                self.jobs.labels(state=state).set(getattr(stats, state))
            self.decode_steps.set(stats.steps)
            self.model_threads.set(stats.threads)
        store = getattr(core, "store", None)
        if store is not None:
            totals: dict[str, int] = {}
            for owner, src in store.sources().items():
                totals[owner.kind] = totals.get(owner.kind, 0) + src.num_blocks()
            self.memory_blocks.clear()
            for kind, blocks in totals.items():
                self.memory_blocks.labels(kind=kind).set(blocks)


class MetricsMiddleware:
    """ASGI middleware: counts every HTTP request by method, route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("path_template") or "unmatched"
            method = scope.get("method", "GET")
            self.metrics.requests.labels(method, route, str(status["code"])).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - t0)

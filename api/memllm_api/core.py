"""The process-wide parts of the server, made once in the app's lifespan.

:class:`Core` loads the model, opens storage and builds the services in the background, so that
``GET /health`` can answer 503 while loading and 200 once :attr:`Core.ready` is set. Request handlers
reach it through :func:`get_core`; nothing here is a module-level global.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import torch
from litestar import Litestar, Request

from memllm.settings import Settings
from memllm_api.config import ApiSettings
from memllm_api.errors import ApiError

log = logging.getLogger("memllm.api")


@dataclass
class Core:
    settings: Settings
    api: ApiSettings
    engine: Any = None
    store: Any = None
    knowledge: Any = None  # memllm.knowledge.service.KnowledgeService
    chat: Any = None  # memllm.chat.service.ChatService
    embedder: Any = None
    scheduler: Any = None  # memllm.serving.scheduler.Scheduler
    metrics: Any = None  # memllm_api.metrics.Metrics
    model_name: str = ""
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    load_error: str | None = None
    started_at: float = field(default_factory=time.time)
    background: set[asyncio.Task] = field(default_factory=set)

    async def load(self) -> None:
        """Model, storage, services, scheduler, demo knowledge base; then ``ready``."""
        from memllm.chat.service import ChatService
        from memllm.engine import Engine
        from memllm.knowledge.embeddings import Embedder
        from memllm.knowledge.service import KnowledgeService
        from memllm.loading import load_model
        from memllm.memory.faiss_index import SEARCH_OBSERVERS
        from memllm.serving.scheduler import Scheduler
        from memllm_storage.store import MemoryStore

        t0 = time.perf_counter()
        if self.metrics is not None:
            SEARCH_OBSERVERS.append(self.metrics.knn_latency.observe)
        # Read before any thread sets a count: PyTorch starts each new thread at the count last set
        # by any thread, so after the loader's set_num_threads(1) this thread would read 1.
        threads = self.settings.threads or torch.get_num_threads()
        single = dataclasses.replace(self.settings, threads=0)  # load_model must not raise it again
        loaded = await asyncio.to_thread(_single_threaded, load_model, single)
        self.engine = Engine(loaded, self.settings.memory, retrieval=self.settings.retrieval)
        self.model_name = loaded.name
        if self.api.migrate:
            await migrate_database(self.settings)
        self.store = await MemoryStore.from_settings(self.settings)
        on_step = self.metrics.observe_step if self.metrics is not None else None
        self.scheduler = Scheduler(self.engine, max_batch=self.api.max_batch, on_step=on_step, threads=threads)
        self.embedder = ModelThreadEmbedder(Embedder(), self.scheduler)
        await asyncio.to_thread(self.embedder.encode_query, "warm up")
        self.knowledge = KnowledgeService(
            self.store, self.engine, self.embedder, max_bytes=self.api.max_upload_bytes, scheduler=self.scheduler
        )
        await self.knowledge.recover_interrupted()  # ingestions a stopped or crashed server left half-read
        self.chat = ChatService(
            self.engine,
            self.store,
            scheduler=self.scheduler,
            max_live=self.settings.chat_max_live,
            spill=self.settings.chat_spill,
        )
        if self.api.demo_kb:
            await self._demo_kb()
        log.info("ready in %.1f s", time.perf_counter() - t0)
        self.ready.set()

    async def _demo_kb(self) -> None:
        from memllm.knowledge.cli import DEMO_DIR

        await self.knowledge.create_kb("demo", "memllm's own sample document", exist_ok=True)
        report = await self.knowledge.ingest_paths("demo", [DEMO_DIR], progress=False)
        for r in report.errors:
            log.warning("demo knowledge base: %s", r.error)

    def spawn(self, coro) -> asyncio.Task:
        """A background task the server keeps track of (cancelled at shutdown)."""
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        return task

    async def close(self) -> None:
        from memllm.memory.faiss_index import SEARCH_OBSERVERS

        if self.metrics is not None and self.metrics.knn_latency.observe in SEARCH_OBSERVERS:
            SEARCH_OBSERVERS.remove(self.metrics.knn_latency.observe)
        for task in list(self.background):
            task.cancel()
        for task in list(self.background):
            with contextlib.suppress(BaseException):
                await task
        if self.chat is not None:
            await self.chat.close()  # spills the idle live states: the next start restores them
        if self.scheduler is not None:
            await self.scheduler.close()
        if self.store is not None:
            await self.store.close()


def _single_threaded(fn, *args: Any) -> Any:
    """Run ``fn`` with one intra-op thread on this (worker) thread.

    Every thread that runs parallel torch work keeps its own OpenMP team; with more team threads
    than cores, libgomp throttles its spin-waits and every decode step gets slower (see
    memllm/serving/scheduler.py). So only the scheduler's model thread runs multi-threaded.
    """
    torch.set_num_threads(1)
    return fn(*args)


class ModelThreadEmbedder:
    """The sentence embedder, run on the scheduler's model thread (the one thread that runs torch
    work in parallel; see :func:`_single_threaded`). Same interface as ``Embedder``."""

    def __init__(self, embedder: Any, scheduler: Any) -> None:
        self.embedder, self.scheduler = embedder, scheduler
        self.name = embedder.name

    @property
    def dim(self) -> int:
        return self.embedder.dim

    @property
    def model(self) -> Any:
        return self.embedder.model

    def encode(self, texts: Any, show_progress: bool = False) -> Any:
        return self.scheduler.run_sync(self.embedder.encode, texts, show_progress)

    def encode_query(self, text: str) -> Any:
        return self.scheduler.run_sync(self.embedder.encode_query, text)


async def migrate_database(settings: Settings) -> None:
    """Bring the database to the code's schema (a fresh SQLite file is created in the data dir)."""
    from memllm_storage.engine import make_engine
    from memllm_storage.migrate import upgrade

    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.resolved_database_url)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


def lifespan_for(core: Core):
    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        app.state.core = core

        async def load() -> None:
            try:
                await core.load()
            except Exception as exc:
                core.load_error = f"{type(exc).__name__}: {exc}"
                log.exception("the server could not start")

        core.spawn(load())
        try:
            yield
        finally:
            await core.close()

    return lifespan


def get_core(request: Request) -> Core:
    return request.app.state.core


def ready_core(request: Request) -> Core:
    """The core, or a 503 while the model is still loading (or failed to load)."""
    core = get_core(request)
    if not core.ready.is_set():
        if core.load_error:
            raise ApiError(503, f"the server failed to start: {core.load_error}", "load_failed")
        raise ApiError(503, "the model is still loading; retry in a few seconds", "loading")
    return core

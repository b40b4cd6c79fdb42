"""Continuous batching: one model thread decodes every running stream together.

Decode is bound by reading the weights (the whole model per token), so B streams decoded in one
forward cost little more than one. A :class:`Scheduler` owns the one thread that runs the model.
Its loop, round after round:

1. takes new work: jobs (``submit``) and exclusive tasks (``run``);
2. runs at most one task (ingestion, a state rebuild: any callable that uses the model);
3. retires cancelled jobs; admits queued jobs while fewer than ``max_batch`` are admitted;
4. one forward (:func:`~memllm.serving.batch.packed_step`) that reads the next prompt chunk
   (``Engine.prefill_end``: a chunk, or a long prompt's final tokens) of admitted jobs, up to
   ``prefill_budget`` tokens, together with one token of every running stream: prompt reading
   shares the weight reads with decoding, and a long prompt does not freeze the running streams;
   each job turns its logits into its next token (``job.next_token``), finished jobs retire, jobs
   done reading join the running.

Jobs are :mod:`memllm.serving.jobs` state machines; a job's events (Token, Text, then Done) reach
its :class:`JobHandle`, an async iterator (or a plain one from a worker thread). A job's errors
(its prompt, its attention state, its sampling callbacks) fail that job only: the exception is
raised to its consumer. ``handle.cancel()`` (a client that went away) stops the job before the
next round. A job's attention state belongs to the model thread from ``submit`` until the handle
is released (it finished, failed or was cancelled: ``await handle.aclose()`` waits for that);
do not touch it meanwhile.

Everything the model thread runs is under ``torch.inference_mode``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from memllm.attention import StreamingAttention
from memllm.serving.batch import packed_step
from memllm.serving.batch_kv import BatchKV
from memllm.serving.jobs import Job, Text, Token

if TYPE_CHECKING:
    from memllm.engine import Engine

log = logging.getLogger(__name__)

T = TypeVar("T")


class SchedulerClosed(RuntimeError):
    """The scheduler was closed before this work finished (or it was submitted after)."""


@dataclass(frozen=True)
class Done:
    """The last event of a job that was not failed by an exception."""

    finish_reason: str | None  # the job's ("stop" | "length"), or "cancelled"
    prompt_tokens: int
    completion_tokens: int  # Token events delivered
    ttft_s: float | None  # submit -> first Token event (None if there was none)
    total_s: float  # submit -> done


Event = Token | Text | Done


@dataclass
class SchedulerStats:
    """A snapshot of the scheduler (``Scheduler.stats()``): gauges, then counters since start."""

    queued: int = 0  # submitted, waiting for a place in the batch (queue depth)
    prefilling: int = 0  # admitted, reading their prompts
    running: int = 0  # decoding
    batch_size: int = 0  # streams in the last decode step
    tasks_queued: int = 0
    threads: int = 0  # the model thread's intra-op threads (0 until it has started)
    submitted: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    steps: int = 0  # decode steps
    tokens_generated: int = 0  # Token events delivered
    prefill_tokens: int = 0
    tasks_run: int = 0
    ttft_count: int = 0
    ttft_sum_s: float = 0.0


class JobHandle:
    """A submitted job, seen from its consumer: ``async for event in handle`` (or ``for``).

    Events: :class:`~memllm.serving.jobs.Token` / :class:`~memllm.serving.jobs.Text` as the job
    produces them, then one :class:`Done`. If the job fails, iteration raises its exception
    instead (:class:`SchedulerClosed` if the scheduler closed first). ``cancel()`` is safe from any
    thread at any time; a cancelled job ends with ``Done(finish_reason="cancelled")``.
    """

    def __init__(self, scheduler: Scheduler, loop: asyncio.AbstractEventLoop | None) -> None:
        self._scheduler = scheduler
        self._loop = loop
        self._lock = threading.Condition()
        self._items: deque[Event | BaseException] = deque()
        self._ended = False  # the final item (Done or an exception) is queued
        self._wakeup = asyncio.Event() if loop is not None else None
        self._cancel = threading.Event()
        self._released: concurrent.futures.Future[None] = concurrent.futures.Future()
        self.done: Done | None = None  # set when the job finished, before its consumer reads it
        self.error: BaseException | None = None

    # ------------------------------------------------------------------------------- consumer side
    def cancel(self) -> None:
        """Stop the job at the next round (no-op once it ended)."""
        if not self._cancel.is_set():
            self._cancel.set()
            self._scheduler._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def released(self) -> bool:
        """The model thread no longer uses the job's state (it finished, failed or was cancelled)."""
        return self._released.done()

    async def aclose(self) -> None:
        """Cancel if still running, and wait until the model thread has let go of the state.

        The wait is shielded: a caller cancelled while it waits (a client that went away) must not
        cancel the release future itself, which the model thread completes."""
        self.cancel()
        await asyncio.shield(asyncio.wrap_future(self._released))

    def close(self) -> None:
        """``aclose`` for worker threads (on the model thread itself it only cancels)."""
        self.cancel()
        if threading.current_thread() is not self._scheduler._thread:
            self._released.result()

    async def __aenter__(self) -> JobHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __aiter__(self) -> JobHandle:
        if self._wakeup is None:
            raise RuntimeError("this job was submitted outside an event loop: iterate it with `for`")
        return self

    async def __anext__(self) -> Event:
        assert self._wakeup is not None
        while True:
            with self._lock:
                if self._items:
                    return self._take()
                if self._ended:
                    raise StopAsyncIteration
                self._wakeup.clear()
            await self._wakeup.wait()

    def __iter__(self) -> Iterator[Event]:
        while True:
            with self._lock:
                while not self._items and not self._ended:
                    self._lock.wait()
                if not self._items:
                    return
                item = self._take()
            yield item

    def _take(self) -> Event:
        item = self._items.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    async def result(self) -> Done:
        """Consume the remaining events; the final Done (raises the job's error)."""
        done = None
        async for event in self:
            if isinstance(event, Done):
                done = event
        assert done is not None
        return done

    # ------------------------------------------------------------------------------ model side
    def _push(self, items: Sequence[Event | BaseException], final: bool = False) -> None:
        if not items:
            return
        with self._lock:
            self._items.extend(items)
            self._ended = self._ended or final
            self._lock.notify_all()
        if self._loop is not None and self._wakeup is not None:
            try:
                self._loop.call_soon_threadsafe(self._wakeup.set)
            except RuntimeError:  # the consumer's event loop is gone: nobody is listening
                self._cancel.set()

    def _finish(self, done: Done | None, error: BaseException | None = None) -> None:
        self.done, self.error = done, error
        self._push([done if error is None else error], final=True)
        if self._released.set_running_or_notify_cancel():  # False: someone cancelled the wait itself
            self._released.set_result(None)


@dataclass
class _Entry:
    """A submitted job and where it stands on the model thread."""

    job: Job
    state: StreamingAttention
    prompt: list[int]
    handle: JobHandle
    logits: torch.Tensor | None  # given at submit: the prompt is already read
    submitted: float
    read: int = 0  # prompt tokens read
    token: int | None = None  # the next token to read (running jobs)
    completion_tokens: int = 0
    ttft_s: float | None = None


@dataclass
class _Task:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    future: concurrent.futures.Future[Any]


class Scheduler:
    """Continuous batching over one engine (see the module docstring).

    ``max_batch``: most jobs admitted at once (prefilling + decoding); the rest wait in a queue.
    ``prefill_budget``: prompt tokens read per round, in the same forward as the running streams'
    tokens (at least one chunk). ``on_first_token(seconds)``: called with each job's time to first
    token; ``on_step(batch_size, seconds)``: after each step that decoded (its seconds include the
    prompt chunks read in the same forward). Both run on the model thread and
    must be quick (e.g. Prometheus observe calls); their exceptions are logged and ignored.

    ``threads``: if given, ``torch.set_num_threads(threads)`` on the model thread when it starts.
    Performance note: every thread that runs multi-threaded torch ops gets its own OpenMP team;
    with more team threads than cores libgomp throttles its spin-waits and every parallel region
    pays a wake-up (measured on 2 cores: decode steps ~20-30% slower than with the model thread's
    team alone). So load the model and run other torch work (embeddings) with one intra-op thread
    where decode speed matters (see ``memllm bench batch``).
    """

    def __init__(
        self,
        engine: Engine,
        max_batch: int = 16,
        *,
        prefill_budget: int = 512,
        on_first_token: Callable[[float], None] | None = None,
        on_step: Callable[[int, float], None] | None = None,
        threads: int | None = None,
        name: str = "memllm-model",
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.engine = engine
        self.threads = threads
        self.max_batch = max_batch
        self.prefill_budget = max(1, prefill_budget)
        self.on_first_token = on_first_token
        self.on_step = on_step
        self._cond = threading.Condition()
        self._inbox: deque[_Entry | _Task] = deque()  # guarded by _cond
        self._closing = False  # guarded by _cond
        self._stats = SchedulerStats()
        # model thread only
        self._waiting: deque[_Entry] = deque()
        self._prefilling: deque[_Entry] = deque()
        self._running: list[_Entry] = []
        self._tasks: deque[_Task] = deque()
        self._in_round = False
        self._finishing: list[tuple[_Entry, Done | None, BaseException | None]] = []  # ended this round
        cfg = engine.model.config
        self._kv = BatchKV(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, engine.model.dtype)  # model thread only
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    # ----------------------------------------------------------------------------------- API
    def submit(
        self,
        job: Job,
        state: StreamingAttention,
        prompt_ids: Sequence[int],
        *,
        logits: torch.Tensor | None = None,
    ) -> JobHandle:
        """Queue ``job`` on ``state``: read ``prompt_ids`` (unless ``logits`` (V,) after an
        already-read prompt are given), then decode, batched with the other running jobs.

        Call it from the event loop that will iterate the handle (or from a worker thread with no
        running loop: iterate with ``for``). Sets ``state.finish_reason`` when the job finishes
        (None while it runs, or if it is cancelled or fails).
        """
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = JobHandle(self, loop)
        entry = _Entry(job, state, list(prompt_ids), handle, logits, time.perf_counter())
        state.finish_reason = None
        self._post(entry)
        return handle

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` on the model thread, alone (between decode steps); its result.

        If the caller is cancelled before the call starts, it does not run."""
        return await asyncio.wrap_future(self._post_task(fn, args, kwargs))

    def run_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``run`` for worker threads (and for the model thread itself: then it calls ``fn`` now)."""
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        return self._post_task(fn, args, kwargs).result()

    def checkpoint(self) -> None:
        """Called by a long task on the model thread (a prefill's progress callback, say) when its
        state is consistent: the running streams advance one round meanwhile (new jobs are admitted
        and prefilled, one decode step). No-op anywhere else."""
        if threading.current_thread() is not self._thread or self._in_round:
            return
        self._take_inbox()
        self._round()

    def stats(self) -> SchedulerStats:
        """A snapshot of the gauges and counters (cheap; safe from any thread)."""
        with self._cond:
            snap = dataclasses.replace(self._stats)
            snap.queued += sum(isinstance(x, _Entry) for x in self._inbox)
            snap.tasks_queued += sum(isinstance(x, _Task) for x in self._inbox)
        return snap

    @property
    def closed(self) -> bool:
        return self._closing

    async def close(self) -> None:
        """Stop: unfinished jobs and tasks fail with :class:`SchedulerClosed`; waits for the thread
        (the step or task in progress completes first)."""
        self._request_close()
        await asyncio.to_thread(self._thread.join)

    def close_sync(self) -> None:
        self._request_close()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    # ------------------------------------------------------------------------------ plumbing
    def _request_close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _post(self, item: _Entry | _Task) -> None:
        with self._cond:
            if self._closing:
                raise SchedulerClosed("the scheduler is closed")
            self._inbox.append(item)
            if isinstance(item, _Entry):
                self._stats.submitted += 1
            self._cond.notify_all()

    def _post_task(self, fn: Callable[..., Any], args: tuple, kwargs: dict) -> concurrent.futures.Future[Any]:
        task = _Task(fn, args, kwargs, concurrent.futures.Future())
        self._post(task)
        return task.future

    # ----------------------------------------------------------------------------- model thread
    def _main(self) -> None:
        try:
            if self.threads:
                torch.set_num_threads(self.threads)
            with self._cond:
                self._stats.threads = torch.get_num_threads()
            with torch.inference_mode():
                while True:
                    with self._cond:
                        while not self._closing and not self._inbox and not self._busy():
                            self._cond.wait()
                        if self._closing:
                            break
                    self._take_inbox()
                    if self._tasks:
                        self._run_task(self._tasks.popleft())
                    self._round()
        except BaseException:  # a bug here: fail everything rather than leave consumers waiting
            log.exception("the scheduler's model thread failed")
        finally:
            with self._cond:
                self._closing = True
            self._shutdown()

    def _busy(self) -> bool:
        return bool(self._waiting or self._prefilling or self._running or self._tasks)

    def _take_inbox(self) -> None:
        with self._cond:
            items = list(self._inbox)
            self._inbox.clear()
        for item in items:
            (self._waiting if isinstance(item, _Entry) else self._tasks).append(item)  # type: ignore[arg-type]
        self._update_gauges()

    def _run_task(self, task: _Task) -> None:
        if not task.future.set_running_or_notify_cancel():
            return
        try:
            result = task.fn(*task.args, **task.kwargs)
        except BaseException as exc:  # delivered to the caller, the loop goes on
            task.future.set_exception(exc)
        else:
            task.future.set_result(result)
        self._stats.tasks_run += 1

    def _round(self) -> None:
        self._in_round = True
        try:
            self._retire_cancelled()
            while self._waiting and len(self._prefilling) + len(self._running) < self.max_batch:
                self._prefilling.append(self._waiting.popleft())
            self._step()
        finally:
            self._in_round = False
            self._deliver_finished()

    def _update_gauges(self) -> None:
        with self._cond:
            s = self._stats
            s.queued, s.prefilling, s.running = len(self._waiting), len(self._prefilling), len(self._running)
            s.tasks_queued = len(self._tasks)

    def _retire_cancelled(self) -> None:
        """Drop cancelled jobs (their consumers are told at the end of the round)."""
        gone = []
        for queue in (self._waiting, self._prefilling):
            for e in [e for e in queue if e.handle.cancelled]:
                queue.remove(e)
                gone.append(e)
        for e in [e for e in self._running if e.handle.cancelled]:
            self._running.remove(e)
            gone.append(e)
        for e in gone:
            self._end(e, "cancelled")

    def _chunks(self) -> list[tuple[_Entry, list[int]]]:
        """The prompt chunks to read this round: the next chunk of each admitted job, in order, up to
        ``prefill_budget`` tokens (at least one chunk). Jobs whose prompt was read before submit
        (given logits) join the running streams here."""
        for e in [e for e in self._prefilling if e.logits is not None]:
            self._prefilling.remove(e)
            logits, e.logits = e.logits, None
            if self._advance(e, logits):
                self._running.append(e)
        for e in [e for e in self._prefilling if not e.prompt]:
            self._prefilling.remove(e)
            self._fail(e, ValueError("nothing to read: the prompt is empty"))
        chunks: list[tuple[_Entry, list[int]]] = []
        budget = self.prefill_budget
        for e in self._prefilling:
            if budget <= 0:
                break
            end = self.engine.prefill_end(e.state, e.read, len(e.prompt))
            ids = e.prompt[e.read : end]
            e.state.reading = self.engine.reading_part(e.state, e.read, end, len(e.prompt))
            chunks.append((e, ids))
            budget -= len(ids)
        return chunks

    def _step(self) -> None:
        """One packed forward: prompt chunks of admitted jobs and a token of every running stream."""
        chunks = self._chunks()
        batch = self._running
        self._stats.batch_size = len(batch)
        if not chunks and not batch:
            return
        failures: dict[int, Exception] = {}
        chunk_failures: dict[int, Exception] = {}
        t0 = time.perf_counter()
        try:
            chunk_logits, logits = packed_step(
                self.engine.model,
                [(e.state, ids) for e, ids in chunks],
                [e.state for e in batch],
                [e.token for e in batch],
                failures,
                self._kv,
                chunk_failures,
            )
        except Exception as exc:  # outside every stream's attention: the whole step failed
            log.exception("a step over %d streams and %d prompt chunks failed", len(batch), len(chunks))
            self._running = []
            for e, _ in chunks:
                self._prefilling.remove(e)
            for e in [*batch, *(e for e, _ in chunks)]:
                self._fail(e, exc)
            return
        if batch:
            self._stats.steps += 1
            self._callback(self.on_step, len(batch), time.perf_counter() - t0)
        still = []
        for i, e in enumerate(batch):
            if i in failures:
                self._fail(e, failures[i])
            elif self._advance(e, logits[i]):
                still.append(e)
        for i, (e, ids) in enumerate(chunks):
            if i in chunk_failures:
                self._prefilling.remove(e)
                self._fail(e, chunk_failures[i])
                continue
            e.read += len(ids)
            self._stats.prefill_tokens += len(ids)
            if e.read < len(e.prompt):
                continue
            self._prefilling.remove(e)
            if self._advance(e, chunk_logits[i]):
                still.append(e)
        self._running = still

    def _advance(self, e: _Entry, logits: torch.Tensor) -> bool:
        """Hand the job its logits; deliver its events. True if it has a token to read next."""
        try:
            token = e.job.next_token(logits)
            events = e.job.take_events()
        except Exception as exc:
            self._fail(e, exc)
            return False
        n_tokens = sum(isinstance(ev, Token) for ev in events)
        if n_tokens and e.ttft_s is None:
            e.ttft_s = time.perf_counter() - e.submitted
            self._stats.ttft_count += 1
            self._stats.ttft_sum_s += e.ttft_s
            self._callback(self.on_first_token, e.ttft_s)
        e.completion_tokens += n_tokens
        self._stats.tokens_generated += n_tokens
        e.handle._push(events)
        if token is None:
            e.state.finish_reason = e.job.finish_reason
            self._end(e, e.job.finish_reason)
            return False
        e.token = token
        return True

    def _end(self, e: _Entry, finish_reason: str | None) -> None:
        if finish_reason == "cancelled":
            self._stats.cancelled += 1
        else:
            self._stats.completed += 1
        done = Done(finish_reason, len(e.prompt), e.completion_tokens, e.ttft_s, time.perf_counter() - e.submitted)
        self._finishing.append((e, done, None))

    def _fail(self, e: _Entry, exc: BaseException) -> None:
        if not isinstance(exc, SchedulerClosed):
            log.warning("job failed: %s: %s", type(exc).__name__, exc)
            self._stats.failed += 1
        self._finishing.append((e, None, exc))

    def _deliver_finished(self) -> None:
        """Tell the consumers of jobs that ended, after the gauges count them out (so a consumer that
        wakes on its job's end sees stats without it)."""
        self._update_gauges()
        finishing, self._finishing = self._finishing, []
        for e, done, exc in finishing:
            e.handle._finish(done, exc)

    def _callback(self, fn: Callable[..., None] | None, *args: Any) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            log.exception("scheduler metrics callback failed")

    def _shutdown(self) -> None:
        self._take_inbox()
        for e in [*self._waiting, *self._prefilling, *self._running]:
            self._fail(e, SchedulerClosed("the scheduler was closed"))
        for task in self._tasks:
            if task.future.set_running_or_notify_cancel():
                task.future.set_exception(SchedulerClosed("the scheduler was closed"))
        self._waiting.clear()
        self._prefilling.clear()
        self._running = []
        self._tasks.clear()
        self._deliver_finished()

"""Generations the routes stream: a session turn, a knowledge-base answer, a plain completion.

Each is an async iterator of text pieces (``pieces()``) that fills :attr:`Generation.outcome`
(usage, finish reason, sources, memory trace) when it ends. :meth:`Generation.stream` adds the
server's time limit and metrics. Closing the iterator early (a client that disconnects) cancels the
model work: the scheduler drops the stream at its next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from memllm.sampling import SamplingParams


@dataclass
class Outcome:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str | None = None
    sources: list[dict[str, Any]] = field(default_factory=list)
    memory_trace: list[dict[str, Any]] = field(default_factory=list)
    ttft_s: float | None = None
    message_id: int | None = None  # the stored assistant message (session turns)

    @property
    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


class Generation:
    endpoint = "completion"

    def __init__(self, core: Any) -> None:
        self.core = core
        self.outcome = Outcome()
        self._timed_out = False

    def pieces(self) -> AsyncIterator[str]:
        raise NotImplementedError

    def cut(self) -> bool:
        """Called at the request time limit: True if the generation ends itself soon and must be
        read to its end (a session turn records its truncated reply), False to close it now."""
        return False

    async def stream(self) -> AsyncIterator[str]:
        """``pieces()`` under the request time limit; records time to first token and tokens/s."""
        t0 = time.perf_counter()
        deadline = t0 + self.core.api.request_timeout_s
        texts: list[str] = []
        it = self.pieces()
        try:
            while (piece := await self._next(it, deadline)) is not None:
                if self.outcome.ttft_s is None:
                    self.outcome.ttft_s = time.perf_counter() - t0
                texts.append(piece)
                yield piece
        finally:
            await it.aclose()
        if self._timed_out:
            self.outcome.finish_reason = "length"
        if not self.outcome.text:
            self.outcome.text = "".join(texts)
        self._observe(time.perf_counter() - t0)

    async def _next(self, it: AsyncIterator[str], deadline: float) -> str | None:
        """The next piece; None at the end, or at the time limit for a generation that cannot be
        :meth:`cut` (one that can is read on, without a limit, to its end)."""
        if not self._timed_out and time.perf_counter() >= deadline and not self._time_up():
            return None
        task = asyncio.ensure_future(anext(it))
        try:
            if not self._timed_out:
                await asyncio.wait({task}, timeout=deadline - time.perf_counter())
                if not task.done() and not self._time_up():
                    return None
            return await task
        except StopAsyncIteration:
            return None
        finally:
            if not task.done():  # closing: the generation stops at its await (the model work is cancelled)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _time_up(self) -> bool:
        """Mark the time limit reached; whether the generation goes on to its end (:meth:`cut`)."""
        self._timed_out = True
        return self.cut()

    def _observe(self, seconds: float) -> None:
        metrics = getattr(self.core, "metrics", None)
        if metrics is None:
            return
        o = self.outcome
        metrics.prompt_tokens.labels(self.endpoint).inc(o.prompt_tokens)
        metrics.tokens.labels(self.endpoint).inc(o.completion_tokens)
        if o.ttft_s is not None:
            metrics.ttft.labels(self.endpoint).observe(o.ttft_s)
            decode_s = seconds - o.ttft_s
            if o.completion_tokens > 1 and decode_s > 0:
                metrics.tokens_per_second.observe((o.completion_tokens - 1) / decode_s)

    async def collect(self) -> Outcome:
        async for _ in self.stream():
            pass
        return self.outcome


class TurnGeneration(Generation):
    """A user turn in a session: its memory holds every earlier turn (and its knowledge bases)."""

    endpoint = "session"

    def __init__(self, core: Any, session_id: int, text: str, params: SamplingParams) -> None:
        super().__init__(core)
        self.turn = core.chat.turn(session_id, text, params, trace=True)

    def cut(self) -> bool:
        """The turn ends at its next token and records the reply so far (finish reason "length").
        One that has not started replying (waiting on its session) is closed, recording nothing:
        the request fails (503) rather than answer a reply that no one will remember."""
        if self.turn.cut():
            return True
        from memllm_api.errors import ApiError

        raise ApiError(
            503, "the session turn did not start within the request time limit; nothing was recorded", "timeout"
        )

    async def pieces(self) -> AsyncIterator[str]:
        async for piece in self.turn.stream():
            yield piece
        r = self.turn.result
        assert r is not None
        o = self.outcome
        o.text, o.prompt_tokens, o.completion_tokens = r.text, r.prompt_tokens, r.completion_tokens
        o.finish_reason, o.message_id = r.finish_reason, r.assistant_message_id
        o.sources = [session_citation(c) for c in r.citations]
        o.memory_trace = [dataclasses.asdict(t) for t in r.trace]


class AnswerGeneration(Generation):
    """A knowledge-base answer (``KnowledgeService.ask``) streamed piece by piece."""

    endpoint = "query"

    def __init__(self, core: Any, kb_id: int, question: str, **ask: Any) -> None:
        super().__init__(core)
        self.kb_id, self.question, self.ask = kb_id, question, ask

    async def pieces(self) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[str | None] = asyncio.Queue()

        def on_text(piece: str) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, piece)

        task = asyncio.ensure_future(self.core.knowledge.ask(self.kb_id, self.question, on_text=on_text, **self.ask))
        task.add_done_callback(lambda _t: loop.call_soon_threadsafe(queue.put_nowait, None))
        try:
            while (piece := await queue.get()) is not None:
                yield piece
            answer = task.result()
        finally:
            if not task.done():
                task.cancel()
        o = self.outcome
        o.text, o.prompt_tokens, o.completion_tokens = answer.text, answer.prompt_tokens, answer.completion_tokens
        o.finish_reason = answer.finish_reason
        o.sources = [kb_citation(self.kb_id, c) for c in answer.citations]
        o.memory_trace = [t.as_dict() for t in answer.trace]


class PlainGeneration(Generation):
    """Prompt ids into a fresh attention state, through the scheduler (batched with other streams).

    ``kb_ids``: the knowledge bases whose memory sources follow the state's own sink in its memory
    view (in that order), to name the blocks of the memory trace. ``constraint``: a grammar the
    output follows (:class:`memllm.constrain.Constraint`, one per generation); ``logprobs``: how
    many alternatives each token's logprob carries (None: no logprobs). Every output token (a
    :class:`~memllm.serving.jobs.Token`, with its logprobs if asked) is appended to ``tokens``
    before the text it completes is yielded.

    ``start()`` submits the job (``pieces()`` does it if not done): start several generations
    before iterating any, and the scheduler admits them in the same round (batched together).
    """

    def __init__(
        self,
        core: Any,
        state: Any,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        sources: list[dict[str, Any]] | None = None,
        endpoint: str = "completion",
        kb_ids: Sequence[int] = (),
        constraint: Any = None,
        logprobs: int | None = None,
    ) -> None:
        super().__init__(core)
        self.state, self.prompt_ids, self.params = state, list(prompt_ids), params
        self.outcome.prompt_tokens = len(self.prompt_ids)
        self.outcome.sources = sources or []
        self.endpoint = endpoint
        self.kb_ids = list(kb_ids)
        self.constraint, self.logprobs = constraint, logprobs
        self.tokens: list[Any] = []
        self._handle: Any = None

    def start(self) -> None:
        """Submit the job to the scheduler (once)."""
        if self._handle is not None:
            return
        from memllm.serving.jobs import GenerateJob
        from memllm.textstream import TextStream

        engine = self.core.engine
        stream = TextStream(engine.tokenizer, self.params.stop)
        job = GenerateJob(
            self.params,
            engine.stop_ids,
            self.prompt_ids,
            stream=stream,
            constraint=self.constraint,
            logprobs=self.logprobs,
        )
        self._handle = self.core.scheduler.submit(job, self.state, self.prompt_ids)

    async def pieces(self) -> AsyncIterator[str]:
        from memllm.serving.jobs import Text, Token
        from memllm.serving.scheduler import Done

        self.start()
        handle = self._handle
        try:
            async for event in handle:
                if isinstance(event, Text):
                    yield event.text
                elif isinstance(event, Token):  # counted as they come: a stream cut short still reports usage
                    self.outcome.completion_tokens += 1
                    self.tokens.append(event)
                elif isinstance(event, Done):
                    self.outcome.finish_reason = event.finish_reason
                    self.outcome.completion_tokens = event.completion_tokens
        finally:
            await handle.aclose()  # cancels the job if the consumer left early
        self.outcome.memory_trace = self._trace()

    def _trace(self, n: int = 8) -> list[dict[str, Any]]:
        """The memory blocks that drew the most attention: which source, which passage."""
        trace = getattr(self.state, "trace", None)
        if trace is None:
            return []
        from memllm.memory.source import MemoryView

        memory = self.state.memory
        sources = memory.sources if isinstance(memory, MemoryView) else [memory]
        out = []
        for view_id, mass in trace.top(n):
            src_index, bid = (int(view_id) >> 48, int(view_id) & ((1 << 48) - 1)) if len(sources) > 1 else (0, view_id)
            entry: dict[str, Any] = {"source": "input", "block_id": int(bid), "mass": round(float(mass), 6)}
            entry["retrieved"] = int(trace.retrieved.get(view_id, 0))
            if 1 <= src_index <= len(self.kb_ids):
                entry["source"] = f"kb-{self.kb_ids[src_index - 1]}"
                info = getattr(sources[src_index], "block_info", None)
                found = info([int(bid)])[0] if info is not None else None
                if found is not None:
                    entry.update(document_id=found.document_id, chunk_id=found.chunk_id)
                    entry.update(token_start=found.token_start, token_end=found.token_end)
            out.append(entry)
        return out


def kb_citation(kb_id: int, c: Any) -> dict[str, Any]:
    """A knowledge-base citation in the API's shape."""
    return {
        "kb_id": kb_id,
        "document_id": c.document_id,
        "document_name": c.source_name,
        "chunk_id": c.chunk_id,
        "text": c.snippet,
        "score": round(float(c.score), 6),
        "char_start": c.char_start,
        "char_end": c.char_end,
    }


def session_citation(c: Any) -> dict[str, Any]:
    """A citation from a session turn's memory trace, in the same shape."""
    return {
        "kb_id": c.kb_id,
        "document_id": c.document_id,
        "document_name": c.source_name,
        "chunk_id": c.chunk_id,
        "text": c.text,
        "score": round(float(c.mass), 6),
        "char_start": None,
        "char_end": None,
    }

"""The choices of an OpenAI reply: n generations of one prompt, shaped as chat or text choices,
whole or streamed.

The n generations are started together (``start`` submits each job before any is iterated), so the
scheduler admits them in one round and decodes them in the same batch. Streamed, their pieces are
interleaved as they come, each chunk carrying its choice's ``index``; a choice that may be tool calls
is held back until it is known to be calls (then sent as one ``tool_calls`` delta per call at its
end) or text (then streamed as usual). See :mod:`memllm_api.structured` for the plan and
:mod:`memllm_api.logprobs` for the logprobs shapes.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from memllm.constrain import parse_tool_calls
from memllm_api.generation import PlainGeneration
from memllm_api.logprobs import TokenTexts, chat_entries, legacy
from memllm_api.structured import OutputPlan


@dataclass
class Shape:
    """How the choices are written: the output ``plan`` (tool calls are read back when it allows
    them), ``texts`` (token texts: set when logprobs were asked), ``echo`` (text completions: the
    prompt before each choice's text)."""

    plan: OutputPlan
    texts: TokenTexts | None = None
    echo: str = ""


def usage(gens: Sequence[PlainGeneration]) -> dict[str, int]:
    """The prompt counted once (it is one prompt), completion tokens of every choice."""
    prompt = gens[0].outcome.prompt_tokens
    completion = sum(g.outcome.completion_tokens for g in gens)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def extras(gen: PlainGeneration) -> dict[str, Any]:
    return {"sources": gen.outcome.sources, "memory_trace": gen.outcome.memory_trace}


async def collect(gens: Sequence[PlainGeneration]) -> None:
    """Run every generation to its end (started together, decoded in one batch)."""
    for g in gens:
        g.start()
    await asyncio.gather(*(g.collect() for g in gens))


def tool_calls_of(text: str) -> list[dict[str, Any]] | None:
    """OpenAI ``tool_calls`` of a reply made of call blocks (None if it is not one)."""
    calls = parse_tool_calls(text)
    if calls is None:
        return None
    return [
        {
            "id": f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for c in calls
    ]


def chat_choice(index: int, gen: PlainGeneration, shape: Shape) -> dict[str, Any]:
    """A finished chat choice: its message (text, or tool calls), finish reason, logprobs."""
    o = gen.outcome
    finish = o.finish_reason or "stop"
    message: dict[str, Any] = {"role": "assistant", "content": o.text}
    calls = tool_calls_of(o.text) if shape.plan.calls else None
    if calls:
        message, finish = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
    logprobs = {"content": chat_entries(gen.tokens, shape.texts)} if shape.texts is not None else None
    return {"index": index, "message": message, "finish_reason": finish, "logprobs": logprobs, **extras(gen)}


def text_choice(index: int, gen: PlainGeneration, shape: Shape) -> dict[str, Any]:
    """A finished text completion choice (legacy logprobs if asked)."""
    o = gen.outcome
    logprobs = legacy(gen.tokens, shape.texts, len(shape.echo))[0] if shape.texts is not None else None
    text = shape.echo + o.text
    return {
        "index": index,
        "text": text,
        "finish_reason": o.finish_reason or "stop",
        "logprobs": logprobs,
        **extras(gen),
    }


async def interleaved(gens: Sequence[PlainGeneration]) -> AsyncIterator[tuple[int, str | None]]:
    """(choice index, text piece) as the pieces come, and (index, None) when a choice ended.
    Leaving early (or a failure of one) stops them all."""
    for g in gens:
        g.start()
    queue: asyncio.Queue[tuple[int, str | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, g: PlainGeneration) -> None:
        try:
            async for piece in g.stream():
                await queue.put((i, piece))
            await queue.put((i, None))
        except Exception as exc:
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)]
    try:
        running = len(gens)
        while running:
            i, item = await queue.get()
            if isinstance(item, BaseException):
                raise item
            running -= item is None
            yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class ChatChunks:
    """Chat ``choices`` entries of the stream, per choice (see the module docstring)."""

    def __init__(self, gens: Sequence[PlainGeneration], shape: Shape) -> None:
        self.gens, self.shape = gens, shape
        self.sent = [0] * len(gens)  # tokens whose logprobs went out, per choice
        self.held: list[list[str] | None] = [[] if shape.plan.calls else None for _ in gens]  # None: text mode

    def opening(self, i: int) -> dict[str, Any]:
        return {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def _logprobs(self, i: int) -> dict[str, Any] | None:
        if self.shape.texts is None:
            return None
        tokens = self.gens[i].tokens
        new, self.sent[i] = tokens[self.sent[i] :], len(tokens)
        return {"content": chat_entries(new, self.shape.texts)}

    def piece(self, i: int, text: str) -> list[dict[str, Any]]:
        held = self.held[i]
        if held is not None:
            held.append(text)
            joined = "".join(held)
            if self.shape.plan.calls_only or not joined or joined.startswith("<"):
                return []  # calls (or not known yet): held back until the end
            self.held[i], text = None, joined  # an ordinary answer: stream it from here
        return [{"index": i, "delta": {"content": text}, "logprobs": self._logprobs(i), "finish_reason": None}]

    def closing(self, i: int) -> list[dict[str, Any]]:
        gen, held = self.gens[i], self.held[i]
        finish = gen.outcome.finish_reason or "stop"
        out: list[dict[str, Any]] = []
        if held is not None:
            calls = tool_calls_of("".join(held))
            if calls:
                deltas = [{"index": k, **call} for k, call in enumerate(calls)]
                out.append({"index": i, "delta": {"tool_calls": deltas}, "logprobs": None, "finish_reason": None})
                finish = "tool_calls"
            elif held:  # not calls after all (cut short by max_tokens): the text as it is
                out.append({"index": i, "delta": {"content": "".join(held)}, "logprobs": None, "finish_reason": None})
        last = {"index": i, "delta": {}, "logprobs": self._logprobs(i), "finish_reason": finish, **extras(gen)}
        return [*out, last]


class TextChunks:
    """Text completion ``choices`` entries of the stream, per choice (legacy logprobs per piece)."""

    def __init__(self, gens: Sequence[PlainGeneration], shape: Shape) -> None:
        self.gens, self.shape = gens, shape
        self.sent = [0] * len(gens)
        self.offset = [len(shape.echo)] * len(gens)

    def _logprobs(self, i: int) -> dict[str, Any] | None:
        if self.shape.texts is None:
            return None
        tokens = self.gens[i].tokens
        new, self.sent[i] = tokens[self.sent[i] :], len(tokens)
        out, self.offset[i] = legacy(new, self.shape.texts, self.offset[i])
        return out

    def opening(self, i: int) -> dict[str, Any] | None:
        if not self.shape.echo:
            return None
        return {"index": i, "text": self.shape.echo, "logprobs": None, "finish_reason": None}

    def piece(self, i: int, text: str) -> list[dict[str, Any]]:
        return [{"index": i, "text": text, "logprobs": self._logprobs(i), "finish_reason": None}]

    def closing(self, i: int) -> list[dict[str, Any]]:
        gen = self.gens[i]
        finish = gen.outcome.finish_reason or "stop"
        return [{"index": i, "text": "", "logprobs": self._logprobs(i), "finish_reason": finish, **extras(gen)}]


async def stream_frames(
    gens: Sequence[PlainGeneration], chunks: ChatChunks | TextChunks, head: dict[str, Any], include_usage: bool
) -> AsyncIterator[dict[str, Any]]:
    """The SSE frames of a streamed reply: openings, pieces, closings (each chunk one choice), then
    (``include_usage``) a chunk with no choices and the usage of all of them."""
    for i in range(len(gens)):
        opening = chunks.opening(i)
        if opening is not None:
            yield {**head, "choices": [opening]}
    async for i, piece in interleaved(gens):
        entries = chunks.closing(i) if piece is None else chunks.piece(i, piece)
        for entry in entries:
            yield {**head, "choices": [entry]}
    if include_usage:
        yield {**head, "choices": [], "usage": usage(gens)}

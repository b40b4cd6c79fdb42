"""What one stream does with each logits vector: the decoding logic as a small state machine.

A *job* turns the logits after everything read so far into the next token to read (or ``None``
when it is finished) and queues output events. Whoever drives it (:func:`run_job` here, one stream
at a time; :class:`memllm.serving.scheduler.Scheduler`, many streams batched) owns the model work:

    logits = <read the prompt>
    while (token := job.next_token(logits)) is not None:
        <deliver job.take_events()>
        logits = <read token into the state>
    <deliver job.take_events()>

Invariant: when ``next_token`` is called, every token it returned before has been read, and
``job.read_ids`` lists exactly those tokens, so the state holds ``prompt + read_ids``. If the
driver stops early (a cancelled job), the last returned token may be unread; it is not in
``read_ids``. When ``next_token`` returns ``None`` the state is consistent: it holds the whole
exchange, including the token that closed the turn, and a conversation can continue from it.

:class:`GenerateJob` is the one job; two configurations of it serve the engine and the chat:

* plain (``Engine.generation_job``): sample until a stop id or ``max_tokens``; a sampled stop id
  is read back into the state (it closes the turn) and not output. Finish ``"stop"``/``"length"``.
* chat reply (``memllm.conversation.reply_job``): also decodes text through a
  :class:`~memllm.textstream.TextStream` (stop strings) and, after a stop string or
  ``max_tokens``, reads the end-of-turn marker (``close_id``) so the turn is closed in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from memllm.attention import StreamingAttention
from memllm.sampling import SamplingParams, sample
from memllm.serving.batch import decode_step
from memllm.textstream import TextStream


@dataclass(frozen=True)
class Token:
    """A generated token of the answer (stop ids and closing tokens are not output).

    With logprobs asked of the job: ``logprob`` is the token's log-probability under the model's
    raw distribution (log-softmax of the logits as the model gave them: before logit bias,
    penalties, temperature, top-k/p and any grammar mask), ``top_logprobs`` the most likely
    (id, logprob) pairs of that distribution, most likely first.
    """

    id: int
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Text:
    """Text that became final (jobs with a TextStream only): the pieces concatenate to the answer."""

    text: str


class LogitsConstraint(Protocol):
    """A grammar over the output (:class:`memllm.constrain.Constraint`): masks the logits before
    each sample and is advanced by each sampled output token; ``done`` once the output is complete.
    Sampling one of ``eos_ids`` ends the answer (where the grammar allows it)."""

    eos_ids: frozenset[int]

    @property
    def done(self) -> bool: ...

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (V,) -> a copy with the tokens the grammar forbids next at -inf."""
        ...

    def advance(self, token: int) -> None: ...


class Job(Protocol):
    """What a driver needs of a job (see the module docstring for the protocol)."""

    finish_reason: str | None

    def next_token(self, logits: torch.Tensor) -> int | None:
        """logits (V,) float32 after everything read so far -> the token to read next, or None."""
        ...

    def take_events(self) -> list[Token | Text]:
        """Output queued since the last call, in order (and forget it)."""
        ...


class GenerateJob:
    """Sampling, stop conditions and output of one generation (see the module docstring).

    ``prompt_ids``: the prompt (only for the repetition penalty's history). ``stop_ids``: sampled
    ids that end the answer (read, not output; none with ``params.ignore_eos``). ``stream``: decode
    text (Text events) and stop at its stop strings. ``close_id``: read after a stop string or
    ``max_tokens`` to close the turn. ``read_ids``: a list to fill with every id read after the
    prompt. ``on_token(id)``: called for every sampled id (stop ids included), before it is read.
    ``constraint``: a grammar the answer must follow (sampling sees only the tokens it allows; when
    it is complete the answer ends, finish ``"stop"``; its end tokens end the answer like stop ids,
    even with ``ignore_eos``). ``logprobs``: None, or how many alternatives (0..20) each Token
    event carries with its own logprob (see :class:`Token`).

    After the job: ``generated`` holds the answer's ids, ``finish_reason`` is ``"stop"`` or
    ``"length"`` (None while running or if never finished).
    """

    def __init__(
        self,
        params: SamplingParams,
        stop_ids: Collection[int],
        prompt_ids: Sequence[int] = (),
        *,
        stream: TextStream | None = None,
        close_id: int | None = None,
        read_ids: list[int] | None = None,
        on_token: Callable[[int], None] | None = None,
        constraint: LogitsConstraint | None = None,
        logprobs: int | None = None,
    ) -> None:
        self.params = params
        self.stop_ids = frozenset() if params.ignore_eos else frozenset(stop_ids)
        self.stream = stream
        self.close_id = close_id
        self.read_ids: list[int] = read_ids if read_ids is not None else []
        self.on_token = on_token
        self.constraint = constraint
        self.logprobs = logprobs
        self.generated: list[int] = []
        self.finish_reason: str | None = None
        self._history = list(prompt_ids)
        self._rng = params.generator()
        self._events: list[Token | Text] = []
        self._unread: int | None = None  # returned by the last next_token; read before the next call
        self._closing: int | None = None  # a token still to read after the finish was decided

    def next_token(self, logits: torch.Tensor) -> int | None:
        if self._unread is not None:
            self.read_ids.append(self._unread)
            self._unread = None
        token = self._decide(logits) if self.finish_reason is None else None
        if token is None and self._closing is not None:
            token, self._closing = self._closing, None
        self._unread = token
        return token

    def take_events(self) -> list[Token | Text]:
        events, self._events = self._events, []
        return events

    def _decide(self, logits: torch.Tensor) -> int | None:
        """Sample the next token of the answer, or finish (then returns None or a token to read)."""
        if len(self.generated) >= self.params.max_tokens:
            self._finish("length", self.close_id)
            return None
        c = self.constraint
        token = sample(logits if c is None else c.mask(logits), self.params, self._history, self._rng)
        if self.on_token is not None:
            self.on_token(token)
        if token in self.stop_ids or (c is not None and token in c.eos_ids):
            self._finish("stop", None)
            return token  # read back: it closes the turn in memory
        if c is not None:
            c.advance(token)
        self.generated.append(token)
        self._history.append(token)
        self._events.append(self._token_event(logits, token))
        if self.stream is not None:
            piece = self.stream.push(token)
            if piece:
                self._events.append(Text(piece))
            if self.stream.stopped:
                self._finish("stop", self.close_id)
        if c is not None and c.done and self.finish_reason is None:
            self._finish("stop", self.close_id)  # the grammar is complete: nothing more may follow
        return token

    def _token_event(self, logits: torch.Tensor, token: int) -> Token:
        """The Token event, with the raw model logprobs if asked (see :class:`Token`)."""
        if self.logprobs is None:
            return Token(token)
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # (V,)
        top: tuple[tuple[int, float], ...] = ()
        if self.logprobs > 0:
            values, ids = torch.topk(logprobs, min(self.logprobs, logprobs.numel()))
            top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        return Token(token, float(logprobs[token]), top)

    def _finish(self, reason: str, closing: int | None) -> None:
        self.finish_reason = reason
        self._closing = closing
        if self.stream is not None:
            tail = self.stream.finish()
            if tail:
                self._events.append(Text(tail))


@torch.inference_mode()
def run_job(
    engine,
    state: StreamingAttention,
    job: Job,
    prompt_ids: Sequence[int],
    logits: torch.Tensor | None = None,
) -> Iterator[Token | Text]:
    """Drive ``job`` on one stream, synchronously; yields its events as they come.

    Reads ``prompt_ids`` first (unless ``logits`` (V,) after an already-read prompt are given).
    A token's events are yielded before the token is read, so a consumer that stops early leaves
    the state without it. Sets ``state.finish_reason`` to the job's when it finishes (None until).
    """
    state.finish_reason = None
    if logits is None:
        logits = engine.prefill(state, prompt_ids)
    while (token := job.next_token(logits)) is not None:
        yield from job.take_events()
        logits = decode_step(engine.model, [state], [token])[0]
    yield from job.take_events()
    state.finish_reason = job.finish_reason

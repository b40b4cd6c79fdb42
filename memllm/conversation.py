"""A chat read incrementally into one attention state, one message at a time.

:class:`ChatTemplate` renders what one new message adds to a chat's template text without
re-rendering the history: it renders the first and the last earlier message with and without the
new one and keeps the difference (exact for templates whose per-message text does not depend on
messages further back, like ChatML; anything else is detected and refused). So a turn's cost does
not grow with the history.

The *stream* of a chat is the concatenation of the token ids each message contributed:

* an appended message (history, import): ``owed + delta(message)`` encoded;
* a user turn answered by the model: ``owed + delta(user, generation prompt)`` encoded;
* the model's reply: the generated ids plus the end-of-turn token (whatever text the template puts
  after the end-of-turn marker, ``"\\n"`` in ChatML, is *owed* and read with the next message).

:class:`Conversation` is the in-process chat (no persistence) used by ``memllm generate``-style
tools; persisted chat sessions live in :mod:`memllm.chat`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from memllm.attention import StreamingAttention
from memllm.engine import Engine
from memllm.sampling import SamplingParams
from memllm.serving.jobs import GenerateJob, Text, run_job
from memllm.textstream import TextStream

END_OF_TURN = "<|im_end|>"

Message = dict[str, str]


class TemplateError(RuntimeError):
    """The model's chat template cannot be extended one message at a time."""


class ChatTemplate:
    def __init__(self, tokenizer, end_of_turn: str = END_OF_TURN) -> None:
        self.tokenizer = tokenizer
        self.end_of_turn = end_of_turn

    def render(self, messages: Sequence[Message], generation_prompt: bool = False) -> str:
        if not messages:
            return ""
        return self.tokenizer.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=generation_prompt, tokenize=False
        )

    @staticmethod
    def context(first: Message | None, last: Message | None, count: int) -> list[Message]:
        """The earlier messages a delta is rendered against: the first and the last one."""
        if count == 0 or first is None:
            return []
        if count == 1 or last is None:
            return [first]
        return [first, last]

    def delta(self, context: Sequence[Message], new: Message, generation_prompt: bool = False) -> str:
        """Template text that ``new`` adds after ``context`` (plus the generation prompt if asked)."""
        before = self.render(context)
        after = self.render([*context, new], generation_prompt)
        if not after.startswith(before):
            raise TemplateError("the chat template is not prefix-stable for this model; cannot extend a chat")
        return after[len(before) :]

    def owed_after_reply(self, context: Sequence[Message], reply: Message) -> str:
        """Template text after the end-of-turn marker of a generated reply (read with the next message)."""
        text = self.delta(context, reply)
        at = text.rfind(self.end_of_turn)
        return text[at + len(self.end_of_turn) :] if at >= 0 else ""


@dataclass
class ChatCursor:
    """Where a chat's stream stands: enough to render the next message in O(1)."""

    first: Message | None = None
    last: Message | None = None
    count: int = 0
    owed: str = ""  # template text owed before the next message (after a generated reply)
    n_tokens: int = 0  # length of the stream read so far

    def context(self) -> list[Message]:
        return ChatTemplate.context(self.first, self.last, self.count)

    def advance(self, message: Message, n_ids: int, owed: str = "") -> None:
        if self.count == 0:
            self.first = dict(message)
        self.last = dict(message)
        self.count += 1
        self.owed = owed
        self.n_tokens += n_ids


@dataclass
class Conversation:
    """An in-process multi-turn chat over one attention state (nothing persisted)."""

    engine: Engine
    state: StreamingAttention
    system: str | None = None
    cursor: ChatCursor = field(default_factory=ChatCursor)

    def __post_init__(self) -> None:
        self.template = ChatTemplate(self.engine.tokenizer)
        self.messages: list[Message] = []
        if self.system:
            self.append({"role": "system", "content": self.system})

    def message_ids(self, message: Message, generation_prompt: bool = False) -> list[int]:
        text = self.cursor.owed + self.template.delta(self.cursor.context(), message, generation_prompt)
        return self.engine.encode(text)

    def append(self, message: Message) -> list[int]:
        """Read a message into the state without answering it; returns its stream ids."""
        ids = self.message_ids(message)
        self.engine.prefill(self.state, ids)
        self.cursor.advance(message, len(ids))
        self.messages.append(dict(message))
        return ids

    def reply(self, user: str, params: SamplingParams) -> Iterator[str]:
        """Add a user turn and stream the assistant's answer as text pieces."""
        user_msg = {"role": "user", "content": user}
        ids = self.message_ids(user_msg, generation_prompt=True)
        self.cursor.advance(user_msg, len(ids))
        self.messages.append(user_msg)
        reply_ids: list[int] = []
        stream = TextStream(self.engine.tokenizer, params.stop)
        yield from generate_reply(self.engine, self.state, ids, params, stream, reply_ids)
        reply = {"role": "assistant", "content": stream.text}
        owed = self.template.owed_after_reply(self.cursor.context(), reply)
        self.cursor.advance(reply, len(reply_ids), owed)
        self.messages.append(reply)


def reply_job(
    engine: Engine,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    stream: TextStream,
    read_ids: list[int],
    on_token: Callable[[int], None] | None = None,
) -> GenerateJob:
    """The chat-reply job (see memllm/serving/jobs.py): the model's stop ids end the reply (read
    back, closing the turn); a stop string of ``stream`` or ``max_tokens`` ends it and the
    end-of-turn marker is read to close the turn. ``read_ids`` receives every id the reply adds to
    the state; ``on_token(id)`` is called for each sampled id."""
    end_id = engine.tokenizer.convert_tokens_to_ids(END_OF_TURN)
    return GenerateJob(
        params, engine.stop_ids, prompt_ids, stream=stream, close_id=end_id, read_ids=read_ids, on_token=on_token
    )


def generate_reply(
    engine: Engine,
    state: StreamingAttention,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    stream: TextStream,
    read_ids: list[int],
    on_token: Callable[[int], None] | None = None,
) -> Iterator[str]:
    """Read ``prompt_ids``, generate, yield text pieces (:func:`reply_job` driven on this thread).

    ``read_ids`` receives every id the reply added to the state, in order: the generated tokens and
    the token that closed the turn (the model's own stop token, or the end-of-turn marker read
    after a stop string or ``max_tokens``). So when the generator finishes, the state holds exactly
    ``prompt_ids + read_ids``; if the consumer closes it early, ``read_ids`` still lists what was
    read, without a closing token. ``on_token(id)`` is called for each sampled id. Sets
    ``state.finish_reason`` ("stop" or "length").
    """
    job = reply_job(engine, prompt_ids, params, stream, read_ids, on_token)
    for event in run_job(engine, state, job, prompt_ids):
        if isinstance(event, Text):
            yield event.text

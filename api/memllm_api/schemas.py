"""Request bodies (msgspec structs: validated by Litestar, documented in the OpenAPI schema).

OpenAI's request shapes accept and ignore fields we do not use (clients send many); our extensions
(``session_id``, ``kb_ids``, ``memory``) ride in the same body, as the openai client's ``extra_body``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta, Struct

PositiveInt = Annotated[int, Meta(ge=1)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]

# Length limits of the free-text fields (characters; docs/api-contract.md "Limits"). A prompt's real
# bound is the server's ``max_prompt_tokens`` (checked after tokenizing); these refuse absurd bodies
# before any work is done.
MAX_NAME_CHARS = 200
MAX_SHORT_CHARS = 1000  # ids, user tags, model names, stop strings
MAX_DESCRIPTION_CHARS = 8000  # tool and schema descriptions
MAX_SEARCH_CHARS = 4000
MAX_QUESTION_CHARS = 8000
MAX_SYSTEM_CHARS = 20_000
MAX_TEXT_CHARS = 1_048_576  # one message, prompt or tool-call arguments (1 Mi characters)
MAX_EMBEDDING_INPUT_CHARS = 32_768
MAX_MESSAGES = 4096
MAX_STOP_STRINGS = 16
MAX_LOGIT_BIAS = 1024

Name = Annotated[str, Meta(min_length=1, max_length=MAX_NAME_CHARS)]
ShortText = Annotated[str, Meta(max_length=MAX_SHORT_CHARS)]
Description = Annotated[str, Meta(max_length=MAX_DESCRIPTION_CHARS)]
LongText = Annotated[str, Meta(max_length=MAX_TEXT_CHARS)]


class MemoryOptions(Struct, kw_only=True, forbid_unknown_fields=True):
    """Per-request attention settings (stateless requests only; sessions keep their own)."""

    mode: Literal["memory", "window", "full"] | None = None
    top_k: Annotated[int, Meta(ge=1, le=256)] | None = None
    window: Annotated[int, Meta(ge=64, le=8192)] | None = None
    sinks: Annotated[int, Meta(ge=0, le=1024)] | None = None
    decode_search_every: Annotated[int, Meta(ge=1, le=1024)] | None = None

    def overrides(self) -> dict[str, Any]:
        from memllm.settings import memory_overrides

        return memory_overrides(**{f: getattr(self, f) for f in self.__struct_fields__ if f != "mode"})


class ContentPart(Struct, kw_only=True):
    type: ShortText
    text: LongText | None = None


class FunctionCall(Struct, kw_only=True):
    name: ShortText
    arguments: LongText = "{}"  # JSON text, as OpenAI sends it


class MessageToolCall(Struct, kw_only=True):
    """A call in an assistant message of the history."""

    id: ShortText | None = None
    type: ShortText = "function"
    function: FunctionCall


class ChatMessage(Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: LongText | list[ContentPart] | None = None
    name: Annotated[str, Meta(max_length=MAX_NAME_CHARS)] | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant messages: the calls it made
    tool_call_id: ShortText | None = None  # tool messages: the call this is the result of

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class JsonSchemaFormat(Struct, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=64)] = "response"
    description: Description | None = None
    schema: dict[str, Any] | None = None  # None: any JSON object
    strict: bool | None = None  # always enforced (constrained decoding)


class ResponseFormat(Struct, kw_only=True):
    """``text`` (default), ``json_object`` (any JSON object) or ``json_schema``: enforced by
    constrained decoding."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class FunctionDef(Struct, kw_only=True):
    name: Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")]
    description: Description | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object; None: no arguments
    strict: bool | None = None  # always enforced


class Tool(Struct, kw_only=True):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Struct, kw_only=True):
    name: ShortText


class ToolChoiceFunction(Struct, kw_only=True):
    type: Literal["function"]
    function: NamedFunction


TopLogprobs = Annotated[int, Meta(ge=0, le=20)]


class SamplingFields(Struct, kw_only=True):
    model: ShortText | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: ShortText | Annotated[list[ShortText], Meta(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1, le=8)] = 1  # n samples, batched together; with a seed, choice i uses seed + i
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    user: ShortText | None = None
    memory: MemoryOptions | None = None
    kb_ids: list[int] | None = None
    ignore_eos: bool = False  # our extension (as in vLLM): decode max_tokens tokens past end-of-text
    # token id (as a string, as OpenAI) -> offset in [-100, 100]
    logit_bias: Annotated[dict[ShortText, float], Meta(max_length=MAX_LOGIT_BIAS)] | None = None
    response_format: ResponseFormat | None = None

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)[:4]


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: PositiveInt | None = None
    session_id: int | ShortText | None = None  # our extension: chat within a session's persistent memory
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None
    parallel_tool_calls: bool | None = None  # true: up to 4 calls in a reply; default: one (memllm_api.structured)
    logprobs: bool | None = None
    top_logprobs: TopLogprobs | None = None


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: LongText | list[LongText]
    echo: bool = False
    logprobs: TopLogprobs | None = None  # legacy: the number of alternatives per token (0..20)


EmbeddingInput = Annotated[str, Meta(max_length=MAX_EMBEDDING_INPUT_CHARS)]


class EmbeddingRequest(Struct, kw_only=True):
    input: EmbeddingInput | list[EmbeddingInput]
    model: ShortText | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: ShortText | None = None


class CreateKB(Struct, kw_only=True, forbid_unknown_fields=True):
    name: Name  # stripped by the route; blank -> 400
    description: Annotated[str, Meta(max_length=2000)] = ""


class QueryRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    question: Annotated[str, Meta(min_length=1, max_length=MAX_QUESTION_CHARS)]
    mode: Literal["hybrid", "rag", "memory"] = "hybrid"
    k: Annotated[int, Meta(ge=1, le=32)] = 4
    max_tokens: PositiveInt | None = None
    temperature: Temperature = 0.0
    stream: bool = False


class SearchRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    query: Annotated[str, Meta(min_length=1, max_length=MAX_SEARCH_CHARS)]
    k: Annotated[int, Meta(ge=1, le=100)] = 8
    method: Literal["hybrid", "embeddings", "bm25"] = "hybrid"


class CreateSession(Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(max_length=MAX_NAME_CHARS)] | None = None  # stripped; blank -> 400
    system: Annotated[str, Meta(max_length=MAX_SYSTEM_CHARS)] | None = None
    kb_ids: list[int] = msgspec.field(default_factory=list)


class PostMessage(Struct, kw_only=True, forbid_unknown_fields=True):
    content: Annotated[str, Meta(min_length=1, max_length=MAX_TEXT_CHARS)]
    max_tokens: PositiveInt | None = None
    temperature: Temperature = 0.0
    stream: bool = False


class ErrorDetail(Struct, kw_only=True):
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(Struct, kw_only=True):
    """Every 4xx/5xx body (OpenAI's shape)."""

    error: ErrorDetail

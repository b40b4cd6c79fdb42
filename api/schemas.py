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
Name = Annotated[str, Meta(min_length=1, max_length=200)]


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
    type: str
    text: str | None = None


class ChatMessage(Struct, kw_only=True):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content if p.type == "text")
        return self.content or ""


class StreamOptions(Struct, kw_only=True):
    include_usage: bool = False


class SamplingFields(Struct, kw_only=True):
    model: str | None = None
    max_tokens: PositiveInt | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Meta(ge=1, le=1)] = 1
    frequency_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    presence_penalty: Annotated[float, Meta(ge=-2.0, le=2.0)] | None = None
    user: str | None = None
    memory: MemoryOptions | None = None
    kb_ids: list[int] | None = None
    ignore_eos: bool = False  # our extension (as in vLLM): decode max_tokens tokens past end-of-text
    logit_bias: dict[str, float] | None = None  # token id (as a string, as OpenAI) -> offset in [-100, 100]

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        return tuple(s for s in stops if s)[:4]


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    max_completion_tokens: PositiveInt | None = None
    session_id: int | str | None = None  # our extension: chat within a session's persistent memory


class CompletionRequest(SamplingFields, kw_only=True):
    prompt: str | list[str]
    echo: bool = False


class EmbeddingRequest(Struct, kw_only=True):
    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


class CreateKB(Struct, kw_only=True, forbid_unknown_fields=True):
    name: Name
    description: Annotated[str, Meta(max_length=2000)] = ""


class DocumentText(Struct, kw_only=True):
    name: Name
    text: str
    meta: dict[str, Any] | None = None


class QueryRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    question: Annotated[str, Meta(min_length=1)]
    mode: Literal["hybrid", "rag", "memory"] = "hybrid"
    k: Annotated[int, Meta(ge=1, le=32)] = 4
    max_tokens: PositiveInt | None = None
    temperature: Temperature = 0.0
    stream: bool = False


class SearchRequest(Struct, kw_only=True, forbid_unknown_fields=True):
    query: Annotated[str, Meta(min_length=1)]
    k: Annotated[int, Meta(ge=1, le=100)] = 8
    method: Literal["hybrid", "embeddings", "bm25"] = "hybrid"


class CreateSession(Struct, kw_only=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(max_length=200)] | None = None
    system: Annotated[str, Meta(max_length=20000)] | None = None
    kb_ids: list[int] = msgspec.field(default_factory=list)


class PostMessage(Struct, kw_only=True, forbid_unknown_fields=True):
    content: Annotated[str, Meta(min_length=1)]
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

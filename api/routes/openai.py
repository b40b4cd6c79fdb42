"""OpenAI-compatible endpoints under ``/v1``: models, chat completions, completions, embeddings.

Extensions ride in the request body (the openai client's ``extra_body``): ``session_id`` chats
within a session's persistent memory (send only the new message), ``kb_ids`` answers from knowledge
bases (their best passages in the prompt, their memory blocks in attention), ``memory`` sets the
attention of a stateless request. Each choice carries ``sources`` and ``memory_trace``.
"""

from __future__ import annotations

import base64
import secrets
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from litestar import Controller, Request, Response, get, post
from litestar.response import Stream

from api.auth import Caller
from api.core import Core, ready_core
from api.errors import ERROR_RESPONSES, ApiError
from api.generation import Generation, PlainGeneration, TurnGeneration, kb_citation
from api.ownership import owned_kb_ids, owned_session
from api.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, EmbeddingRequest, SamplingFields
from api.sse import SSE_HEADERS, stream_events, streaming_post
from memllm.sampling import SamplingParams, check_logit_bias

KB_CONTEXT_PASSAGES = 4
EMBEDDING_BATCH_LIMIT = 256


def sampling_params(core: Core, req: SamplingFields, max_tokens: int | None) -> SamplingParams:
    """The request's sampling, within the server's limits. Penalties map onto one repetition penalty."""
    limit = core.api.max_output_tokens
    if max_tokens is not None and max_tokens > limit:
        message = f"max_tokens {max_tokens} is above this server's limit of {limit}"
        raise ApiError(400, message, "max_tokens", "max_tokens")
    penalty = max(req.frequency_penalty or 0.0, req.presence_penalty or 0.0, 0.0)
    return SamplingParams(
        max_tokens=max_tokens or core.api.default_max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        repetition_penalty=1.0 + penalty / 2,
        stop=req.stop_strings(),
        seed=req.seed,
        ignore_eos=req.ignore_eos,
        logit_bias=logit_bias(core, req.logit_bias),
    )


def logit_bias(core: Core, bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's ``logit_bias`` ({"token id": offset}) checked against the model's vocabulary."""
    bad_keys = [key for key in bias or {} if not key.strip().isdigit()]
    if bad_keys:
        raise ApiError(400, f"logit_bias: {bad_keys[0]!r} is not a token id", "logit_bias")
    pairs = tuple((int(key), float(offset)) for key, offset in (bias or {}).items())
    try:
        check_logit_bias(pairs, core.engine.model.config.vocab_size)
    except ValueError as exc:
        raise ApiError(400, str(exc), "logit_bias") from None
    return pairs


def check_prompt(core: Core, n_tokens: int) -> None:
    if n_tokens > core.api.max_prompt_tokens:
        raise ApiError(
            400, f"the prompt has {n_tokens} tokens; this server's limit is {core.api.max_prompt_tokens}", "prompt_size"
        )


def _state(core: Core, req: SamplingFields, extra_sources: list[tuple[int, Any]]) -> Any:
    mem = req.memory
    mode = mem.mode if mem is not None else None
    if extra_sources and mode not in (None, "memory"):
        raise ApiError(400, "kb_ids need memory mode (their blocks are read through kNN memory)", "mode", "memory")
    overrides = mem.overrides() if mem is not None else {}
    try:
        return core.engine.new_state(
            mode, extra_sources=[src for _, src in extra_sources], trace=bool(extra_sources), **overrides
        )
    except ValueError as exc:  # settings that do not fit together (the window is not whole blocks, ...)
        raise ApiError(400, f"memory settings: {exc}", "memory_settings", "memory") from None


async def _kb_context(
    core: Core, kb_ids: list[int], query: str
) -> tuple[str, list[dict[str, Any]], list[tuple[int, Any]]]:
    """The best passages of the knowledge bases for ``query`` (prompt text, citations) and their
    memory sources as (kb id, source) for those that have memory blocks."""
    hits: list[tuple[int, Any]] = []
    sources: list[tuple[int, Any]] = []
    for kb_id in kb_ids:
        if query.strip():
            hits += [(kb_id, c) for c in await core.knowledge.search(kb_id, query, k=KB_CONTEXT_PASSAGES)]
        src = await core.knowledge.memory_source(kb_id)
        if src is not None:
            sources.append((kb_id, src))
    hits.sort(key=lambda h: -h[1].score)
    hits = hits[:KB_CONTEXT_PASSAGES]
    text = "\n\n".join(f"[{i + 1}] {c.source_name}: {c.snippet}" for i, (_, c) in enumerate(hits))
    return text, [kb_citation(kb_id, c) for kb_id, c in hits], sources


def _last_user_text(messages: list[ChatMessage]) -> str:
    for m in reversed(messages):
        if m.role == "user":
            return m.text()
    raise ApiError(400, "messages need at least one user message", "no_user_message", "messages")


async def _chat_generation(core: Core, caller: Caller, data: ChatCompletionRequest, params: SamplingParams):
    if data.session_id is not None:
        session_id = await _session_id(core, caller, data.session_id)
        if data.memory is not None or data.kb_ids:
            raise ApiError(400, "a session keeps its own memory settings and knowledge bases", "session_options")
        text = _last_user_text(data.messages)
        check_prompt(core, len(core.engine.encode(text)))
        return TurnGeneration(core, session_id, text, params)
    kb_ids = await owned_kb_ids(core, caller, data.kb_ids)
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in data.messages]
    messages = [m for m in messages if m["role"] in ("system", "user", "assistant")]
    citations: list[dict[str, Any]] = []
    sources: list[tuple[int, Any]] = []
    if kb_ids:
        context, citations, sources = await _kb_context(core, kb_ids, _last_user_text(data.messages))
        if context:
            note = "Answer from these passages when they are relevant; cite them as [n].\n\n" + context
            if messages and messages[0]["role"] == "system":
                messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + note}
            else:
                messages.insert(0, {"role": "system", "content": note})
    try:
        ids = core.engine.chat_ids(messages)
    except Exception as exc:  # a template that refuses the message order
        raise ApiError(400, f"the chat template cannot render these messages: {exc}", "template") from None
    check_prompt(core, len(ids))
    state = _state(core, data, sources)
    return PlainGeneration(core, state, ids, params, citations, endpoint="chat", kb_ids=[k for k, _ in sources])


async def _session_id(core: Core, caller: Caller, ref: int | str) -> int:
    if isinstance(ref, str):
        if ref.isdigit():
            ref = int(ref)
        else:
            found = await core.chat.find(ref, caller.tenant_id)
            if found is None:
                raise ApiError(404, f"session {ref!r} not found", "session_not_found", "session_id")
            ref = found.id
    return (await owned_session(core, caller, ref)).id


def _choice_extras(gen: Generation) -> dict[str, Any]:
    return {"sources": gen.outcome.sources, "memory_trace": gen.outcome.memory_trace}


def _final_choice(gen: Generation, body: dict[str, Any]) -> dict[str, Any]:
    """The one choice of a finished non-streamed answer: ``body`` (message or text) and the rest."""
    finish = gen.outcome.finish_reason or "stop"
    return {"index": 0, **body, "finish_reason": finish, "logprobs": None, **_choice_extras(gen)}


def _openai_stream(
    gen: Generation,
    head: dict[str, Any],
    req: SamplingFields,
    *,
    opening: dict[str, Any] | None,
    piece: Callable[[str], dict[str, Any]],
    closing: dict[str, Any],
) -> Stream:
    """OpenAI's SSE: an ``opening`` choice (if any), one choice per text piece, a ``closing`` choice
    with the finish reason, sources and memory trace, then (``stream_options.include_usage``) a
    chunk with no choices and the usage."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(body: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        return {**head, "choices": [{"index": 0, **body, "finish_reason": finish, **extra}]}

    async def frames():
        if opening is not None:
            yield chunk(opening)
        async for text in gen.stream():
            yield chunk(piece(text))
        yield chunk(closing, gen.outcome.finish_reason or "stop", **_choice_extras(gen))
        if include_usage:
            yield {**head, "choices": [], "usage": gen.outcome.usage}

    return Stream(stream_events(frames()), media_type="text/event-stream", headers=SSE_HEADERS)


class OpenAIController(Controller):
    path = "/v1"
    tags = ("openai",)

    @get("/models", summary="The served model", responses=ERROR_RESPONSES)
    async def models(self, request: Request, caller: Caller) -> dict[str, Any]:
        core = ready_core(request)
        return {
            "object": "list",
            "data": [{"id": core.model_name, "object": "model", "created": int(core.started_at), "owned_by": "memllm"}],
        }

    @streaming_post("/chat/completions", "Chat completion (OpenAI-compatible; SSE with stream=true)")
    async def chat_completions(self, request: Request, caller: Caller, data: ChatCompletionRequest) -> Response:
        core = ready_core(request)
        params = sampling_params(core, data, data.max_completion_tokens or data.max_tokens)
        gen = await _chat_generation(core, caller, data, params)
        cid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": cid, "created": created, "model": core.model_name}
        if data.stream:
            return _openai_stream(
                gen,
                {**head, "object": "chat.completion.chunk"},
                data,
                opening={"delta": {"role": "assistant", "content": ""}},
                piece=lambda text: {"delta": {"content": text}},
                closing={"delta": {}},
            )
        o = await gen.collect()
        choice = _final_choice(gen, {"message": {"role": "assistant", "content": o.text}})
        return Response({**head, "object": "chat.completion", "choices": [choice], "usage": o.usage})

    @streaming_post("/completions", "Text completion (OpenAI-compatible; SSE with stream=true)")
    async def completions(self, request: Request, caller: Caller, data: CompletionRequest) -> Response:
        core = ready_core(request)
        prompts = [data.prompt] if isinstance(data.prompt, str) else data.prompt
        if len(prompts) != 1:
            raise ApiError(400, "send one prompt per request", "one_prompt", "prompt")
        if not prompts[0]:
            raise ApiError(400, "the prompt is empty", "empty_prompt", "prompt")
        params = sampling_params(core, data, data.max_tokens or 16)
        kb_ids = await owned_kb_ids(core, caller, data.kb_ids)
        citations: list[dict[str, Any]] = []
        sources: list[tuple[int, Any]] = []
        prompt = prompts[0]
        if kb_ids:
            context, citations, sources = await _kb_context(core, kb_ids, prompt[-2000:])
            prompt = f"{context}\n\n{prompt}" if context else prompt
        ids = core.engine.encode(prompt)
        if not ids:
            raise ApiError(400, "the prompt has no tokens", "empty_prompt", "prompt")
        check_prompt(core, len(ids))
        state = _state(core, data, sources)
        gen = PlainGeneration(core, state, ids, params, citations, kb_ids=[k for k, _ in sources])
        cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": core.model_name}
        echo = prompts[0] if data.echo else ""
        if data.stream:
            return _openai_stream(
                gen,
                head,
                data,
                opening={"text": echo, "logprobs": None} if echo else None,
                piece=lambda text: {"text": text, "logprobs": None},
                closing={"text": "", "logprobs": None},
            )
        o = await gen.collect()
        choice = _final_choice(gen, {"text": echo + o.text})
        return Response({**head, "choices": [choice], "usage": o.usage})

    @post(
        "/embeddings",
        status_code=200,
        summary="Sentence embeddings from the bundled embedder (OpenAI-compatible)",
        responses=ERROR_RESPONSES,
    )
    async def embeddings(self, request: Request, caller: Caller, data: EmbeddingRequest) -> dict[str, Any]:
        import asyncio

        core = ready_core(request)
        texts = [data.input] if isinstance(data.input, str) else list(data.input)
        if not texts or len(texts) > EMBEDDING_BATCH_LIMIT:
            raise ApiError(400, f"send 1 to {EMBEDDING_BATCH_LIMIT} inputs", "input_count", "input")
        if any(not t.strip() for t in texts):
            raise ApiError(400, "an input is empty", "empty_input", "input")
        if data.dimensions is not None and data.dimensions != core.embedder.dim:
            raise ApiError(400, f"this embedder gives {core.embedder.dim} dimensions", "dimensions", "dimensions")
        vectors = await asyncio.to_thread(core.embedder.encode, texts)
        tokenizer = core.embedder.model.tokenizer
        n_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        items = []
        for i, v in enumerate(np.asarray(vectors, dtype=np.float32)):
            emb: Any = base64.b64encode(v.tobytes()).decode() if data.encoding_format == "base64" else v.tolist()
            items.append({"object": "embedding", "index": i, "embedding": emb})
        return {
            "object": "list",
            "data": items,
            "model": core.embedder.name,
            "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        }

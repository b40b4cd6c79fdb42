"""OpenAI-compatible endpoints under ``/v1``: models, chat completions, completions, embeddings.

Extensions ride in the request body (the openai client's ``extra_body``): ``session_id`` chats
within a session's persistent memory (send only the new message), ``kb_ids`` answers from knowledge
bases (their best passages in the prompt, their memory blocks in attention), ``memory`` sets the
attention of a stateless request. Each choice carries ``sources`` and ``memory_trace``.
"""

from __future__ import annotations

import base64
import dataclasses
import secrets
import time
from typing import Any

import numpy as np
from litestar import Controller, Request, Response, get, post

from memllm.constrain import render_messages, tools_system_text
from memllm.sampling import SamplingParams, check_logit_bias
from memllm_api.auth import Caller
from memllm_api.choices import ChatChunks, Shape, TextChunks, chat_choice, collect, stream_frames, text_choice, usage
from memllm_api.core import Core, ready_core
from memllm_api.errors import ERROR_RESPONSES, ApiError
from memllm_api.generation import Generation, PlainGeneration, TurnGeneration, kb_citation
from memllm_api.logprobs import TokenTexts, chat_logprobs_count
from memllm_api.ownership import owned_kb_ids, owned_session
from memllm_api.schemas import ChatCompletionRequest, ChatMessage, CompletionRequest, EmbeddingRequest, SamplingFields
from memllm_api.sse import sse_response, streaming_post
from memllm_api.structured import OutputPlan, lltokenizer, output_plan
from memllm_storage.repositories import parse_id

KB_CONTEXT_PASSAGES = 4
EMBEDDING_BATCH_LIMIT = 256
MAX_TOKEN_ID_DIGITS = 10  # token ids are below 2**31
PROMPT_CHARS_PER_TOKEN = 8  # a prompt of more characters than 8 x max_prompt_tokens is refused untokenized


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
    pairs = []
    for key, offset in (bias or {}).items():
        token = parse_id(key.strip(), MAX_TOKEN_ID_DIGITS)
        if token is None:
            raise ApiError(400, f"logit_bias: {key[:40]!r} is not a token id", "logit_bias", "logit_bias")
        pairs.append((token, float(offset)))
    try:
        check_logit_bias(pairs, core.engine.model.config.vocab_size)
    except ValueError as exc:
        raise ApiError(400, str(exc), "logit_bias", "logit_bias") from None
    return tuple(pairs)


def check_prompt(core: Core, n_tokens: int) -> None:
    """The server's real bound on a prompt: ``max_prompt_tokens`` (after tokenizing)."""
    if n_tokens > core.api.max_prompt_tokens:
        raise ApiError(
            400, f"the prompt has {n_tokens} tokens; this server's limit is {core.api.max_prompt_tokens}", "prompt_size"
        )


def check_prompt_chars(core: Core, n_chars: int, param: str) -> None:
    """Refuse a prompt too long to be within ``max_prompt_tokens`` before spending time tokenizing it."""
    limit = PROMPT_CHARS_PER_TOKEN * core.api.max_prompt_tokens
    if n_chars > limit:
        message = f"{param}: {n_chars:,} characters in all; this server's limit is {limit:,}"
        raise ApiError(400, message, "prompt_size", param)


def check_full_attention(core: Core, req: SamplingFields, n_prompt: int, max_tokens: int) -> None:
    """Full attention only within the model's trained length (prompt and answer together)."""
    mode = req.memory.mode if req.memory is not None else None
    if (mode or getattr(core.engine.memory_settings, "mode", None)) != "full":  # the request's or the server's
        return
    limit = core.engine.model.config.max_positions
    if n_prompt + max_tokens > limit:
        message = (
            f"memory.mode 'full' attends within the model's trained length of {limit} tokens; the prompt has "
            f"{n_prompt} tokens and max_tokens is {max_tokens}: use the 'memory' or 'window' mode"
        )
        raise ApiError(400, message, "context_length", "memory")


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


def _check_session_request(data: ChatCompletionRequest, top_logprobs: int | None) -> None:
    """A session turn is one free-text reply through the chat service: refuse what it cannot do."""
    if data.memory is not None or data.kb_ids:
        raise ApiError(400, "a session keeps its own memory settings and knowledge bases", "session_options")
    refused = [
        ("n", data.n > 1, "a session turn is one reply: n must be 1"),
        ("response_format", data.response_format is not None and data.response_format.type != "text", None),
        ("tools", bool(data.tools), None),
        ("tool_choice", data.tool_choice not in (None, "none", "auto"), None),
        ("logprobs", top_logprobs is not None, None),
    ]
    for param, bad, message in refused:
        if bad:
            raise ApiError(400, message or f"{param} is not supported with session_id", "session_unsupported", param)


async def _turn_generation(core: Core, caller: Caller, data: ChatCompletionRequest, params: SamplingParams):
    session_id = await _session_id(core, caller, data.session_id)
    text = _last_user_text(data.messages)
    check_prompt_chars(core, len(text), "messages")
    check_prompt(core, len(core.engine.encode(text)))
    return TurnGeneration(core, session_id, text, params)


def _chat_messages(data: ChatCompletionRequest, plan: OutputPlan) -> list[dict[str, str]]:
    """The request's messages as the chat template gets them: tool calls and results written in
    (memllm.constrain.tools), the tools described in the system message."""
    raw: list[dict[str, Any]] = []
    for m in data.messages:
        entry: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
        if m.role == "assistant" and m.tool_calls:
            entry["tool_calls"] = [(c.function.name, c.function.arguments) for c in m.tool_calls]
        raw.append(entry)
    messages = [m for m in render_messages(raw) if m["role"] in ("system", "user", "assistant")]
    if plan.functions:
        _add_system(messages, tools_system_text(plan.functions, plan.forced))
    return messages


def _add_system(messages: list[dict[str, str]], note: str) -> None:
    if messages and messages[0]["role"] == "system":
        messages[0] = {"role": "system", "content": messages[0]["content"] + "\n\n" + note}
    else:
        messages.insert(0, {"role": "system", "content": note})


def _choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """One SamplingParams per choice: with a seed, choice i uses seed + i."""
    if params.seed is None:
        return [params] * n
    return [dataclasses.replace(params, seed=params.seed + i) for i in range(n)]


async def _chat_generations(
    core: Core, caller: Caller, data: ChatCompletionRequest, params: SamplingParams, plan: OutputPlan, top: int | None
) -> list[PlainGeneration]:
    check_prompt_chars(core, sum(len(m.text()) for m in data.messages), "messages")
    kb_ids = await owned_kb_ids(core, caller, data.kb_ids)
    messages = _chat_messages(data, plan)
    citations: list[dict[str, Any]] = []
    sources: list[tuple[int, Any]] = []
    if kb_ids:
        context, citations, sources = await _kb_context(core, kb_ids, _last_user_text(data.messages))
        if context:
            _add_system(messages, "Answer from these passages when they are relevant; cite them as [n].\n\n" + context)
    try:
        ids = core.engine.chat_ids(messages)
    except Exception as exc:  # a template that refuses the message order
        raise ApiError(400, f"the chat template cannot render these messages: {exc}", "template") from None
    check_prompt(core, len(ids))
    check_full_attention(core, data, len(ids), params.max_tokens)
    kb_order = [k for k, _ in sources]
    return [
        PlainGeneration(core, _state(core, data, sources), ids, p, citations, "chat", kb_order, plan.constraint(), top)
        for p in _choice_params(params, data.n)
    ]


async def _shape(core: Core, plan: OutputPlan, top: int | None, echo: str = "") -> Shape:
    texts = None
    if top is not None:
        texts = TokenTexts(plan.lltokenizer if plan.lltokenizer is not None else await lltokenizer(core))
    return Shape(plan, texts, echo)


async def _session_id(core: Core, caller: Caller, ref: int | str) -> int:
    """The id of the caller's session ``ref``: an id (an int or ASCII digits) or a name; else 404."""
    not_found = ApiError(404, f"session {str(ref)[:40]!r} not found", "session_not_found", "session_id")
    if isinstance(ref, str):
        number = parse_id(ref.strip())
        if number is None and ref.strip().isascii() and ref.strip().isdigit():
            raise not_found  # more digits than any id
        if number is None:
            found = await core.chat.find(ref, caller.tenant_id)
            if found is None:
                raise not_found
            ref = found.id
        else:
            ref = number
    try:
        return (await owned_session(core, caller, ref)).id
    except ApiError as exc:
        raise not_found if exc.status == 404 else exc from None


def _usage(req: SamplingFields) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


async def _session_reply(gen: Generation, head: dict[str, Any], req: SamplingFields) -> Response:
    """A session turn's one choice, whole or streamed (OpenAI's SSE: an opening chunk, one chunk per
    text piece, a closing chunk with the finish reason, sources and memory trace, then the usage)."""

    def extras() -> dict[str, Any]:
        return {"sources": gen.outcome.sources, "memory_trace": gen.outcome.memory_trace}

    if not req.stream:
        o = await gen.collect()
        message = {"role": "assistant", "content": o.text}
        choice = {"index": 0, "message": message, "finish_reason": o.finish_reason or "stop", "logprobs": None}
        return Response({**head, "object": "chat.completion", "choices": [{**choice, **extras()}], "usage": o.usage})
    head = {**head, "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish, **extra}
        return {**head, "choices": [choice]}

    async def frames():
        yield chunk({"role": "assistant", "content": ""})
        async for text in gen.stream():
            yield chunk({"content": text})
        yield chunk({}, gen.outcome.finish_reason or "stop", **extras())
        if _usage(req):
            yield {**head, "choices": [], "usage": gen.outcome.usage}

    return sse_response(frames())


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
        top = chat_logprobs_count(data.logprobs, data.top_logprobs)
        cid, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": cid, "created": created, "model": core.model_name}
        if data.session_id is not None:
            _check_session_request(data, top)
            return await _session_reply(await _turn_generation(core, caller, data, params), head, data)
        plan = await output_plan(core, data)
        gens = await _chat_generations(core, caller, data, params, plan, top)
        shape = await _shape(core, plan, top)
        if data.stream:
            frames = stream_frames(
                gens, ChatChunks(gens, shape), {**head, "object": "chat.completion.chunk"}, _usage(data)
            )
            return sse_response(frames)
        await collect(gens)
        choices = [chat_choice(i, g, shape) for i, g in enumerate(gens)]
        return Response({**head, "object": "chat.completion", "choices": choices, "usage": usage(gens)})

    @streaming_post("/completions", "Text completion (OpenAI-compatible; SSE with stream=true)")
    async def completions(self, request: Request, caller: Caller, data: CompletionRequest) -> Response:
        core = ready_core(request)
        prompts = [data.prompt] if isinstance(data.prompt, str) else data.prompt
        if len(prompts) != 1:
            raise ApiError(400, "send one prompt per request", "one_prompt", "prompt")
        if not prompts[0]:
            raise ApiError(400, "the prompt is empty", "empty_prompt", "prompt")
        check_prompt_chars(core, len(prompts[0]), "prompt")
        if data.logprobs is not None and data.echo:
            raise ApiError(400, "logprobs with echo (the prompt's logprobs) is not supported", "echo_logprobs", "echo")
        params = sampling_params(core, data, data.max_tokens or 16)
        plan = await output_plan(core, data)
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
        check_full_attention(core, data, len(ids), params.max_tokens)
        kb_order = [k for k, _ in sources]
        gens = [
            PlainGeneration(
                core,
                _state(core, data, sources),
                ids,
                p,
                citations,
                "completion",
                kb_order,
                plan.constraint(),
                data.logprobs,
            )
            for p in _choice_params(params, data.n)
        ]
        shape = await _shape(core, plan, data.logprobs, prompts[0] if data.echo else "")
        cid, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        head = {"id": cid, "object": "text_completion", "created": created, "model": core.model_name}
        if data.stream:
            frames = stream_frames(gens, TextChunks(gens, shape), head, _usage(data))
            return sse_response(frames)
        await collect(gens)
        choices = [text_choice(i, g, shape) for i, g in enumerate(gens)]
        return Response({**head, "choices": choices, "usage": usage(gens)})

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

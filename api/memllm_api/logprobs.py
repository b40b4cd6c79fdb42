"""Token logprobs in OpenAI's two shapes.

The values are the model's raw distribution: log-softmax of the logits as the model gave them,
before logit bias, penalties, temperature, top-p and any grammar mask (as OpenAI, whose logprobs do
not change with temperature, and vLLM's default ``raw_logprobs``); a token that a grammar forced
may therefore have a low logprob. ``top_logprobs`` are the most likely tokens of that distribution,
most likely first (the sampled token may not be among them).

* chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``;
* legacy completions: ``{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}], "text_offset"}``
  where ``text_offset`` is each token's character offset in the choice's ``text``.

A token's text is its bytes decoded as UTF-8 (a token that holds part of a character shows the
replacement character; ``bytes`` has the exact bytes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from memllm_api.errors import ApiError


class TokenTexts:
    """Token id -> (text, bytes), from the llguidance tokenizer (exact bytes for any HF tokenizer)."""

    def __init__(self, lltokenizer: Any) -> None:
        self._tok = lltokenizer
        self._cache: dict[int, tuple[str, bytes]] = {}

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        found = self._cache.get(token_id)
        if found is None:
            raw = bytes(self._tok.decode_bytes([token_id]))
            found = self._cache[token_id] = (raw.decode("utf-8", errors="replace"), raw)
        return found


def chat_entries(tokens: Sequence[Any], texts: TokenTexts) -> list[dict[str, Any]]:
    """Chat ``logprobs.content`` entries of ``tokens`` (Token events with logprobs)."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        text, raw = texts(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return [
        {**entry(t.id, t.logprob), "top_logprobs": [entry(i, lp) for i, lp in t.top_logprobs]}
        for t in tokens
        if t.logprob is not None
    ]


def legacy(tokens: Sequence[Any], texts: TokenTexts, offset: int) -> tuple[dict[str, Any], int]:
    """Legacy ``logprobs`` of ``tokens`` whose text starts at character ``offset`` of the choice's
    text; and the offset after them."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t in tokens:
        if t.logprob is None:
            continue
        text, _ = texts(t.id)
        out["tokens"].append(text)
        out["token_logprobs"].append(t.logprob)
        out["top_logprobs"].append({texts(i)[0]: lp for i, lp in t.top_logprobs})
        out["text_offset"].append(offset)
        offset += len(text)
    return out, offset


def chat_logprobs_count(logprobs: bool | None, top_logprobs: int | None) -> int | None:
    """The alternatives per token a chat request asks for (None: no logprobs)."""
    if top_logprobs is not None and not logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs_without_logprobs", "top_logprobs")
    return (top_logprobs or 0) if logprobs else None

"""Choosing the next token: small pure functions over a logits vector.

All functions take and return float32 logits of shape (V,); ``sample`` picks one id. Greedy when
temperature is 0. Order: logit bias (as OpenAI's ``logit_bias``), then as in transformers:
repetition penalty, temperature, top-k, top-p.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

LOGIT_BIAS_LIMIT = 100.0


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    repetition_penalty: float = 1.0  # 1 = off; >1 discourages tokens already present
    stop: tuple[str, ...] = ()
    seed: int | None = None
    ignore_eos: bool = False  # generate max_tokens tokens, past the model's end-of-text ids (benchmarks)
    # (token id, offset) pairs added to the logits before anything else; +-100 allows or bans a token
    logit_bias: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if self.max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be > 0")
        check_logit_bias(self.logit_bias)

    def generator(self) -> torch.Generator | None:
        if self.seed is None:
            return None
        return torch.Generator().manual_seed(self.seed)


def check_logit_bias(bias: Sequence[tuple[int, float]], vocab_size: int | None = None) -> None:
    """Raise ValueError unless every token id is in [0, vocab_size) and every offset in [-100, 100]."""
    for token, offset in bias:
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            limit = f"0..{vocab_size - 1}" if vocab_size is not None else "ids >= 0"
            raise ValueError(f"logit_bias: {token} is not a token id of this model ({limit})")
        if not -LOGIT_BIAS_LIMIT <= offset <= LOGIT_BIAS_LIMIT:
            raise ValueError(f"logit_bias: offset {offset} for token {token} is outside [-100, 100]")


def only_tokens_bias(token_ids: Sequence[int]) -> tuple[tuple[int, float], ...]:
    """A logit bias that makes greedy decoding pick among ``token_ids`` only (constrained choice)."""
    return tuple((int(t), LOGIT_BIAS_LIMIT) for t in dict.fromkeys(token_ids))


def apply_logit_bias(logits: torch.Tensor, bias: Sequence[tuple[int, float]]) -> torch.Tensor:
    """Add each (token id, offset) to that token's logit. Ids past the vocabulary raise IndexError."""
    if not bias:
        return logits
    ids = torch.tensor([t for t, _ in bias], dtype=torch.long)
    if int(ids.max()) >= logits.numel():
        raise IndexError(f"logit_bias token id {int(ids.max())} is outside the vocabulary of {logits.numel()}")
    logits = logits.clone()
    logits.index_add_(0, ids, torch.tensor([o for _, o in bias], dtype=logits.dtype))
    return logits


def apply_repetition_penalty(logits: torch.Tensor, previous: Sequence[int], penalty: float) -> torch.Tensor:
    """CTRL-style: divide positive logits of seen tokens by ``penalty``, multiply negative ones."""
    if penalty == 1.0 or not previous:
        return logits
    ids = torch.tensor(sorted(set(previous)), dtype=torch.long)
    seen = logits[ids]
    logits = logits.clone()
    logits[ids] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def apply_top_k(logits: torch.Tensor, k: int) -> torch.Tensor:
    if k <= 0 or k >= logits.numel():
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability sums to at least p."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = cumulative - torch.softmax(sorted_logits, dim=-1) >= p  # mass before this token already >= p
    drop[0] = False  # the most likely token always stays (rounding can push its "mass before" above a tiny p)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(0, order, sorted_logits)


GREEDY_BELOW = 1e-4  # temperatures below this sample greedily (dividing by them overflows to inf)


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    previous: Sequence[int] = (),
    generator: torch.Generator | None = None,
) -> int:
    """logits (V,) float32 -> next token id."""
    logits = apply_logit_bias(logits.float(), params.logit_bias)
    logits = apply_repetition_penalty(logits, previous, params.repetition_penalty)
    if params.temperature < GREEDY_BELOW:
        return int(torch.argmax(logits))
    logits = apply_top_p(apply_top_k(logits / params.temperature, params.top_k), params.top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))

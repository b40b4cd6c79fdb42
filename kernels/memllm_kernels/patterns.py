"""Attention patterns as token-level rules: the one description every backend evaluates.

A :class:`Pattern` says which key index ``j`` a query at absolute position ``p`` may see. All
patterns are causal (``j <= p``) and bottom-right aligned: with ``Tq`` queries over ``Tk`` keys,
query row ``i`` sits at position ``p = i + (Tk - Tq)`` (the last query sees the last key), so one
pattern serves prefill (Tq == Tk), chunked prefill and decode (Tq == 1).

visible(p, j) = (j <= p) and (local(p, j) or global(p, j) or random(p, j))

local, by ``kind``:
    full      every earlier key
    window    p - j < window                                   (sliding window, StreamingLLM, Longformer)
    strided   p - j < stride  or  (p - j) % stride == 0        (Sparse Transformer, strided variant)
    fixed     j // stride == p // stride  or  j % stride >= stride - summary
                                                               (Sparse Transformer, fixed variant)
global:   j < n_global or p < n_global    (the first tokens are global both ways: Longformer,
                                           BigBird-ITC; with a window this is sinks + window)
random:   key block j // random_block is one of ``n_random`` earlier blocks drawn for query block
          p // random_block (BigBird). Draws are seeded per query block, so a longer sequence
          extends a shorter one's table: prefill and token-by-token decode see the same pattern.

Random blocks are drawn among key blocks that lie wholly before the query block, outside the
global prefix and out of the window's reach of the block's first query; fewer candidates than
``n_random`` gives fewer draws (padded with -1 in the table).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Literal

import torch

LocalKind = Literal["full", "window", "strided", "fixed"]
LOCAL_KIND_CODES: dict[str, int] = {"full": 0, "window": 1, "strided": 2, "fixed": 3}


@dataclass(frozen=True)
class Pattern:
    """A causal attention pattern (see the module docstring for the rule). Hashable: usable as a cache key."""

    kind: LocalKind = "full"
    window: int = 0
    stride: int = 0
    summary: int = 0
    n_global: int = 0
    n_random: int = 0
    random_block: int = 64
    seed: int = 0
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind not in LOCAL_KIND_CODES:
            raise ValueError(f"unknown pattern kind {self.kind!r}; expected one of {sorted(LOCAL_KIND_CODES)}")
        if self.kind == "window" and self.window < 1:
            raise ValueError(f"window pattern needs window >= 1, got {self.window}")
        if self.kind in ("strided", "fixed") and self.stride < 1:
            raise ValueError(f"{self.kind} pattern needs stride >= 1, got {self.stride}")
        if self.kind == "fixed" and not 1 <= self.summary <= self.stride:
            raise ValueError(f"fixed pattern needs 1 <= summary <= stride, got {self.summary} / {self.stride}")
        if min(self.n_global, self.n_random) < 0 or self.random_block < 1:
            raise ValueError(f"bad global/random settings in {self}")
        if not self.name:
            object.__setattr__(self, "name", self._default_name())

    def _default_name(self) -> str:
        parts = {
            "full": "full",
            "window": f"window{self.window}",
            "strided": f"strided{self.stride}",
            "fixed": f"fixed{self.stride}/{self.summary}",
        }
        name = parts[self.kind]
        if self.n_global:
            name += f"+global{self.n_global}"
        if self.n_random:
            name += f"+random{self.n_random}x{self.random_block}"
        return name

    @property
    def kind_code(self) -> int:
        """Integer code of ``kind`` (what the Triton kernels take as a compile-time constant)."""
        return LOCAL_KIND_CODES[self.kind]

    @property
    def is_full(self) -> bool:
        return self.kind == "full"


def full() -> Pattern:
    """Causal full attention."""
    return Pattern("full", name="full")


def sliding_window(window: int) -> Pattern:
    """Each query sees its last ``window`` keys (itself included)."""
    return Pattern("window", window=window, name=f"window{window}")


def sinks_window(n_sinks: int, window: int) -> Pattern:
    """StreamingLLM: the first ``n_sinks`` tokens plus a sliding window (memory attention's local part)."""
    return Pattern("window", window=window, n_global=n_sinks, name=f"sinks{n_sinks}+window{window}")


def longformer(window: int, n_global: int) -> Pattern:
    """Longformer: sliding window plus ``n_global`` global tokens at the start of the sequence."""
    return Pattern("window", window=window, n_global=n_global, name=f"longformer{window}+g{n_global}")


def bigbird(window: int, n_global: int, n_random: int, random_block: int = 64, seed: int = 0) -> Pattern:
    """BigBird: window + global tokens + ``n_random`` random earlier key blocks per query block (seeded)."""
    return Pattern(
        "window",
        window=window,
        n_global=n_global,
        n_random=n_random,
        random_block=random_block,
        seed=seed,
        name=f"bigbird{window}+g{n_global}+r{n_random}x{random_block}",
    )


def strided(stride: int) -> Pattern:
    """Sparse Transformer, strided variant: the last ``stride`` keys and every ``stride``-th key before."""
    return Pattern("strided", stride=stride, name=f"strided{stride}")


def fixed(stride: int, summary: int) -> Pattern:
    """Sparse Transformer, fixed variant: own segment of ``stride`` tokens + the last ``summary`` of each."""
    return Pattern("fixed", stride=stride, summary=summary, name=f"fixed{stride}/{summary}")


# ------------------------------------------------------------------------------------------------
# Random blocks (BigBird)


def _random_row(pattern: Pattern, qrb: int) -> list[int]:
    rb = pattern.random_block
    first_q = qrb * rb
    reach = pattern.window if pattern.kind == "window" else (pattern.stride if pattern.kind == "strided" else 0)
    # key block kb is a candidate if it ends before first_q - reach + 1 (out of the window's reach of
    # the block's first query) and starts at or after the global prefix.
    last_ok = (first_q - reach + 1) // rb - 1 if pattern.kind != "full" else qrb - 1
    first_ok = -(-pattern.n_global // rb)  # ceil(n_global / rb)
    n_cand = last_ok - first_ok + 1
    if n_cand <= 0:
        return []
    gen = torch.Generator().manual_seed(pattern.seed * 1_000_003 + qrb)
    picks = torch.randperm(n_cand, generator=gen)[: pattern.n_random] + first_ok
    return sorted(picks.tolist())


@functools.lru_cache(maxsize=64)
def _random_table_cpu(pattern: Pattern, n_query_blocks: int) -> torch.Tensor:
    table = torch.full((max(n_query_blocks, 1), max(pattern.n_random, 1)), -1, dtype=torch.int32)
    for qrb in range(n_query_blocks):
        row = _random_row(pattern, qrb)
        if row:
            table[qrb, : len(row)] = torch.tensor(row, dtype=torch.int32)
    return table


def random_table(pattern: Pattern, k_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Random key blocks per query block: (ceil(k_len / random_block), max(n_random, 1)) int32, -1 = none.

    Row r lists the key blocks (in units of ``random_block`` tokens) that queries at positions
    [r*random_block, (r+1)*random_block) see in full. All ids are < r (strictly earlier blocks).
    """
    n_rows = -(-k_len // pattern.random_block) if pattern.n_random else 0
    return _random_table_cpu(pattern, n_rows).to(device)


# ------------------------------------------------------------------------------------------------
# The token-level rule


def visible(
    pattern: Pattern,
    pos_q: torch.Tensor,
    key_j: torch.Tensor,
    table: torch.Tensor | None = None,
) -> torch.Tensor:
    """The rule itself, on broadcastable int64 tensors of query positions and key indices -> bool.

    ``table`` is :func:`random_table` for the pattern (needed only when ``n_random > 0``).
    """
    p, j = pos_q, key_j
    d = p - j
    ok = d >= 0
    if pattern.kind == "full":
        local = torch.ones_like(ok)
    elif pattern.kind == "window":
        local = d < pattern.window
    elif pattern.kind == "strided":
        local = (d < pattern.stride) | (d % pattern.stride == 0)
    else:  # fixed
        s = pattern.stride
        local = (j // s == p // s) | (j % s >= s - pattern.summary)
    if pattern.n_global:
        local = local | (j < pattern.n_global) | (p < pattern.n_global)
    if pattern.n_random:
        if table is None:
            raise ValueError("a pattern with random blocks needs its random table")
        rb = pattern.random_block
        rows = table[(p // rb).clamp(max=table.shape[0] - 1)]  # (..., n_random) for p's query block
        hit = (rows == (j // rb).unsqueeze(-1)).any(-1)
        local = local | hit
    return ok & local


def token_mask(pattern: Pattern, q_len: int, k_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Dense (q_len, k_len) bool mask, True = may attend (bottom-right aligned). O(q_len * k_len)."""
    if q_len > k_len:
        raise ValueError(f"q_len {q_len} > k_len {k_len}: queries must be the last k_len positions")
    pos = torch.arange(k_len - q_len, k_len, device=device).unsqueeze(1)  # (Tq, 1)
    keys = torch.arange(k_len, device=device).unsqueeze(0)  # (1, Tk)
    table = random_table(pattern, k_len, device) if pattern.n_random else None
    return visible(pattern, pos, keys, table)

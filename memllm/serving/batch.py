"""One forward over several independent streams: the weights are read once for all of them.

The model is stateless (every layer hands its pre-RoPE q/k/v to ``attn.attend``), so B streams
can share a forward: row b of the batch is stream b, and :class:`BatchedAttention` hands each row
to that stream's own :class:`~memllm.attention.StreamingAttention`. Streams may be in different
modes (full/window/memory), at different lengths, with different memories: each state keeps its
own positions, evictions and kNN searches. Every other op of the model (embeddings, norms, linear
layers, the output head) is row-wise, so a stream's logits do not depend on its batch neighbours
(up to float rounding of the batched matrix products).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memllm.attention import StreamingAttention
from memllm.model import Transformer


class BatchedAttention:
    """Attention state of a batch whose row b is ``states[b]`` (each state holds batch 1).

    Every row reads the same number of new tokens T in one forward (``begin(T)`` on every state
    before the model runs, ``end()`` after). With ``failures`` (a dict), an exception raised by one
    state's ``attend`` is recorded as ``failures[b]`` and that row attends to nothing (zeros) for the
    rest of the forward, so the other rows finish; without it, the exception propagates.
    """

    def __init__(self, states: Sequence[StreamingAttention], failures: dict[int, Exception] | None = None) -> None:
        self.states = list(states)
        self.failures = failures

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Hq, T, D), k/v (B, Hkv, T, D) pre-RoPE, row b for ``states[b]`` -> (B, Hq, T, D)."""
        if q.shape[0] != len(self.states):
            raise ValueError(f"batch of {q.shape[0]} rows for {len(self.states)} attention states")
        outs = []
        for b, state in enumerate(self.states):
            if self.failures is not None and b in self.failures:
                outs.append(torch.zeros_like(q[b : b + 1]))
                continue
            try:
                outs.append(state.attend(layer, q[b : b + 1], k[b : b + 1], v[b : b + 1]))
            except Exception as exc:
                if self.failures is None:
                    raise
                self.failures[b] = exc
                outs.append(torch.zeros_like(q[b : b + 1]))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


@torch.inference_mode()
def decode_step(
    model: Transformer,
    states: Sequence[StreamingAttention],
    tokens: torch.Tensor | Sequence[int],
    failures: dict[int, Exception] | None = None,
) -> torch.Tensor:
    """Read one token into each stream: ``tokens[b]`` into ``states[b]``; returns logits (B, V) float32.

    ``tokens``: (B,) or (B, 1) ids. Each state advances by one token exactly as
    ``state.forward(model, tokens[b:b+1].view(1, 1), last_only=True)`` would.

    Failures. Without ``failures`` any exception propagates and no state advances (a state that
    failed may have evicted blocks in ``begin``, which leaves it consistent; the slots of the
    unread token are ignored). With ``failures`` (a dict to fill), a stream whose ``begin`` or
    ``attend`` raises is recorded as ``failures[b] = exception``, does not advance, and gets a row
    of NaN logits; the other streams advance normally. An exception outside the attention states
    (the model itself) always propagates.
    """
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1, 1)
    if ids.shape[0] != len(states):
        raise ValueError(f"{ids.shape[0]} tokens for {len(states)} streams")
    began: list[int] = []
    for b, state in enumerate(states):
        try:
            state.begin(1)
        except Exception as exc:
            if failures is None:
                raise
            failures[b] = exc
            continue
        began.append(b)
    logits = model(ids, BatchedAttention(states, failures), last_only=True)[:, -1]  # (B, V)
    for b in began:
        if failures is None or b not in failures:
            states[b].end()
    if failures:
        logits[list(failures)] = float("nan")
    return logits

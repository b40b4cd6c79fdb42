"""One forward over several independent streams: the weights are read once for all of them.

The model is stateless (every layer hands its pre-RoPE q/k/v to ``attn.attend``), so B streams
can share a forward: row b of the batch is stream b, and :class:`BatchedAttention` hands each row
to that stream's own :class:`~memllm.attention.StreamingAttention`. :func:`packed_step` goes one
step further: prompt chunks of streams that are still reading and one token of every decoding
stream, packed along the time axis of a single batch-1 forward (prompt reading and decoding share
the weight reads; the decoding streams do not stall while a newcomer reads its prompt). Streams may be in different
modes (full/window/memory), at different lengths, with different memories: each state keeps its
own positions, evictions and kNN searches. Every other op of the model (embeddings, norms, linear
layers, the output head) is row-wise, so a stream's logits do not depend on its batch neighbours
(up to float rounding of the batched matrix products).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from memllm.attention import StreamingAttention
from memllm.model import Transformer
from memllm.rope import Rope
from memllm.serving.batch_kv import BatchKV
from memllm_kernels.grouped import few_query_scores


def _isolated(
    failures: dict[int, Exception] | None,
    key: int,
    like: torch.Tensor,
    attend: Callable[..., torch.Tensor],
    *args: torch.Tensor | int,
) -> torch.Tensor:
    """``attend(*args)``, or zeros shaped like ``like`` when stream ``key`` already failed or fails
    now (recorded in ``failures``). Without ``failures`` the exception propagates."""
    if failures is None:
        return attend(*args)
    if key in failures:
        return torch.zeros_like(like)
    try:
        return attend(*args)
    except Exception as exc:
        failures[key] = exc
        return torch.zeros_like(like)


class BatchedAttention:
    """Attention state of a batch whose row b is ``states[b]`` (each state holds batch 1).

    Every row reads the same number of new tokens T in one forward (``begin(T)`` on every state
    before the model runs, ``end()`` after). With ``failures`` (a dict), an exception raised by one
    state's ``attend`` is recorded as ``failures[b]`` and that row attends to nothing (zeros) for the
    rest of the forward, so the other rows finish; without it, the exception propagates.

    With ``kv`` (a :class:`~memllm.serving.batch_kv.BatchKV` synced for ``states``, rows ``rows``)
    and T = 1, the local attention of every stream runs as one batched product per layer (see
    :meth:`_attend_batched`); each state still stores its own keys and does its own memory part.
    """

    def __init__(
        self,
        states: Sequence[StreamingAttention],
        failures: dict[int, Exception] | None = None,
        kv: BatchKV | None = None,
        rows: torch.Tensor | None = None,
    ) -> None:
        self.states = list(states)
        self.failures = failures
        self.kv, self.rows = kv, rows
        if kv is not None:
            cos, sin = zip(*(s._cos_sin for s in self.states), strict=True)  # each (1, D): the new slot
            self.cos, self.sin = torch.stack(cos), torch.stack(sin)  # (B, 1, D)
            self.slots = torch.tensor([s.buf.length for s in self.states])  # (B,) slot of the new token
            n = kv.n_rows
            lengths = torch.ones(n, dtype=torch.long)  # rows not in the batch see one (ignored) slot
            lengths[rows] = self.slots + 1
            self.width = int(lengths.max())
            self.visible = torch.arange(self.width).unsqueeze(0) < lengths.unsqueeze(1)  # (R, width)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Hq, T, D), k/v (B, Hkv, T, D) pre-RoPE, row b for ``states[b]`` -> (B, Hq, T, D)."""
        if q.shape[0] != len(self.states):
            raise ValueError(f"batch of {q.shape[0]} rows for {len(self.states)} attention states")
        if self.kv is not None and q.shape[2] == 1:
            return self._attend_batched(layer, q, k, v)
        outs = [
            _isolated(self.failures, b, q[b : b + 1], s.attend, layer, q[b : b + 1], k[b : b + 1], v[b : b + 1])
            for b, s in enumerate(self.states)
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def _attend_batched(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One decode token per stream: the same math as ``StreamingAttention.attend`` (local part
        by :func:`~memllm_kernels.grouped.decode_attention_with_lse`), with the local attention of all
        streams in one product over the shared rows of ``kv``."""
        kv, rows = self.kv, self.rows
        assert kv is not None and rows is not None
        b, hq, _, d = q.shape
        hkv = k.shape[1]
        g = hq // hkv
        cos, sin = self.cos.unsqueeze(1), self.sin.unsqueeze(1)  # (B, 1, 1, D)
        q_rot, k_rot = Rope.rotate(q, cos, sin), Rope.rotate(k, cos, sin)
        for i, state in enumerate(self.states):
            state.store(layer, k[i : i + 1], k_rot[i : i + 1], v[i : i + 1])
        kv.keys[layer, rows, :, self.slots] = k_rot[:, :, 0]  # (B, Hkv, D) at (row, slot)
        kv.values[layer, rows, :, self.slots] = v[:, :, 0]
        width = self.width
        q_rows = q_rot.new_zeros((kv.n_rows, hkv, g, d))
        q_rows[rows] = q_rot.view(b, hkv, g, d)
        scale = self.states[0]._scale
        scores = few_query_scores(q_rows, kv.keys[layer, :, :, :width]).mul_(scale)
        scores.masked_fill_(~self.visible[:, None, None, :], float("-inf"))  # (R, Hkv, G, width)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        probs = scores.sub_(lse).exp_()
        out = torch.matmul(probs.to(v.dtype), kv.values[layer, :, :, :width])  # (R, Hkv, G, D)
        out_b = out[rows].view(b, hq, 1, d)
        lse_b = lse[rows].view(b, hq, 1)
        mass = None
        outs = []
        for i, state in enumerate(self.states):
            if not state.uses_memory(layer):
                outs.append(out_b[i : i + 1])
                continue
            if mass is None:
                mass = probs.sum(dim=2)  # (R, Hkv, width): attention each local key drew
            row, end = int(rows[i]), int(self.slots[i]) + 1
            local = (out_b[i : i + 1], lse_b[i : i + 1], mass[row : row + 1, :, :end])
            outs.append(_isolated(self.failures, i, local[0], state.finish_layer, layer, q[i : i + 1], *local))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


class PackedAttention:
    """Attention for several streams packed along the time axis of one batch-1 forward.

    The T positions are, in order: ``lengths[i]`` tokens of ``prefill[i]`` for every prompt segment,
    then one token per decoding stream, which go to ``decode`` (a :class:`BatchedAttention`) as a
    batch of B rows of one token. ``failures`` (dict, prompt segment index -> exception): segments
    already failed (their states did not begin) and those whose ``attend`` raises; a failed segment
    attends to nothing (zeros) for the rest of the forward. Without ``failures`` exceptions propagate.
    """

    def __init__(
        self,
        prefill: Sequence[StreamingAttention],
        lengths: Sequence[int],
        failures: dict[int, Exception] | None,
        decode: BatchedAttention | None,
    ) -> None:
        self.prefill, self.lengths, self.failures, self.decode = list(prefill), list(lengths), failures, decode

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (1, Hq, T, D), k/v (1, Hkv, T, D) pre-RoPE -> (1, Hq, T, D)."""
        outs = []
        start = 0
        for i, (state, n) in enumerate(zip(self.prefill, self.lengths, strict=True)):
            seg = slice(start, start + n)
            start += n
            qs, ks, vs = q[:, :, seg], k[:, :, seg], v[:, :, seg]
            outs.append(_isolated(self.failures, i, qs, state.attend, layer, qs, ks, vs))
        if self.decode is not None:

            def rows(x: torch.Tensor) -> torch.Tensor:  # (1, H, B, D) -> (B, H, 1, D)
                return x[0, :, start:].transpose(0, 1).unsqueeze(2).contiguous()

            out = self.decode.attend(layer, rows(q), rows(k), rows(v))  # (B, Hq, 1, D)
            outs.append(out.squeeze(2).transpose(0, 1).unsqueeze(0))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


@torch.inference_mode()
def packed_step(
    model: Transformer,
    prefill: Sequence[tuple[StreamingAttention, Sequence[int]]],
    states: Sequence[StreamingAttention],
    tokens: torch.Tensor | Sequence[int],
    failures: dict[int, Exception] | None = None,
    kv: BatchKV | None = None,
    prefill_failures: dict[int, Exception] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward that reads prompt chunks and decodes: returns (P, V) and (B, V) float32 logits.

    ``prefill``: (state, ids) pairs, P of them, distinct states; each state reads its ids as one
    chunk, exactly as ``state.forward(model, ids, last_only=True)`` would; row i of the first result
    holds the logits after its last id. ``states``/``tokens``: B decoding streams, each reading one
    token as in :func:`decode_step` (``failures``, ``kv``: see there); the second result's row b is
    stream b's. A prompt segment whose ``begin`` or ``attend`` raises is recorded in
    ``prefill_failures`` (if given; else the exception propagates), does not advance, and gets NaN
    logits; the other streams go on. An exception outside the attention states propagates (and no
    state advances).
    """
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if ids.shape[0] != len(states):
        raise ValueError(f"{ids.shape[0]} tokens for {len(states)} streams")
    if not prefill and not states:
        raise ValueError("nothing to read")
    pieces = [torch.as_tensor(list(p), dtype=torch.long) for _, p in prefill]
    if any(p.numel() == 0 for p in pieces):
        raise ValueError("an empty prompt chunk")
    for i, (state, _) in enumerate(prefill):
        try:
            state.prepare_question(model, pieces[i].unsqueeze(0))
            state.begin(pieces[i].numel())
        except Exception as exc:
            if prefill_failures is None:
                raise
            prefill_failures[i] = exc
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
    decode = None
    batched = False
    if states:
        # one stream attends faster on its own (the shared rows cost a few fixed operations per layer)
        batched = kv is not None and len(states) > 1 and not failures and all(s.token_memory is None for s in states)
        if batched:
            assert kv is not None
            decode = BatchedAttention(states, failures, kv, kv.sync(states))
        else:
            decode = BatchedAttention(states, failures)
    lengths = [p.numel() for p in pieces]
    packed = torch.cat([*pieces, ids]).unsqueeze(0)  # (1, T)
    ends = torch.tensor(lengths, dtype=torch.long).cumsum(0) - 1 if lengths else torch.empty(0, dtype=torch.long)
    keep = torch.cat([ends, sum(lengths) + torch.arange(len(states))])
    attention = PackedAttention([s for s, _ in prefill], lengths, prefill_failures, decode)
    try:
        logits = model(packed, attention, keep=keep)[0]  # (P + B, V)
    except BaseException:
        if kv is not None:
            kv.forget(states)
        raise
    for i, (state, _) in enumerate(prefill):
        if not prefill_failures or i not in prefill_failures:
            state.end()
    for b in began:
        if failures is None or b not in failures:
            states[b].end()
    if kv is not None:
        if batched and not failures:
            kv.stepped(states)
        else:
            kv.forget(states)
    prefill_logits, decode_logits = logits[: len(prefill)], logits[len(prefill) :]
    if prefill_failures:
        prefill_logits[list(prefill_failures)] = float("nan")
    if failures:
        decode_logits[list(failures)] = float("nan")
    return prefill_logits, decode_logits


def decode_step(
    model: Transformer,
    states: Sequence[StreamingAttention],
    tokens: torch.Tensor | Sequence[int],
    failures: dict[int, Exception] | None = None,
    kv: BatchKV | None = None,
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

    ``kv``: the scheduler's :class:`~memllm.serving.batch_kv.BatchKV`; when given (and there are
    several streams, none failed to begin, none is in the memorizing mode) the streams' local
    attention is batched.
    """
    return packed_step(model, (), states, tokens, failures, kv)[1]

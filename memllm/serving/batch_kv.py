"""The running streams' rotated keys and values side by side, so a decode step attends for all of
them in one batched product per layer instead of one small product per stream.

Each stream's :class:`~memllm.attention.StreamingAttention` keeps its own KV buffer (the source of
truth); :class:`BatchKV` holds a copy of every running stream's rotated keys and values in one row
of a shared tensor. A decode step appends the new token's key and value to both. A row is copied
again from its state only when the state changed in another way: it joined the batch, read tokens
outside the batched step (a prompt), or evicted a block (which shifts its slots; the state's
buffer bumps ``version``). In steady decoding nothing is copied but the new token.

Shapes: keys, values (L, R, Hkv, C, D) in the model dtype, R rows (one per running stream, reused
when a stream leaves), C slots (grown on demand to the longest stream's length + 1).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memllm.attention import StreamingAttention


class BatchKV:
    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self.keys = torch.empty((n_layers, 0, n_kv_heads, 0, head_dim), dtype=dtype)
        self.values = torch.empty_like(self.keys)
        self._row_of: dict[int, int] = {}  # id(state) -> row
        self._holder: list[StreamingAttention | None] = []  # row -> state (keeps ids unique while mapped)
        self._synced: list[tuple[int, int] | None] = []  # row -> (buffer version, length) the row holds

    @property
    def n_rows(self) -> int:
        return len(self._holder)

    def sync(self, states: Sequence[StreamingAttention]) -> torch.Tensor:
        """Rows for ``states`` (after their ``begin``), copied from the states where out of step.
        Rows of streams not in ``states`` are released. Returns rows (B,) int64."""
        present = {id(s) for s in states}
        for key, row in list(self._row_of.items()):
            if key not in present:
                del self._row_of[key]
                self._holder[row], self._synced[row] = None, None
        self._reserve(len(states), max(s.buf.length + 1 for s in states))
        rows = []
        for state in states:
            row = self._row_of.get(id(state))
            if row is None:
                row = self._holder.index(None)
                self._row_of[id(state)], self._holder[row], self._synced[row] = row, state, None
            buf = state.buf
            if self._synced[row] != (buf.version, buf.length):
                n = buf.length
                self.keys[:, row, :, :n] = buf.rot[:, 0, :, :n]
                self.values[:, row, :, :n] = buf.val[:, 0, :, :n]
            rows.append(row)
        return torch.tensor(rows, dtype=torch.long)

    def stepped(self, states: Sequence[StreamingAttention]) -> None:
        """After a batched step appended one token to every row: the rows hold the states' slots."""
        for state in states:
            self._synced[self._row_of[id(state)]] = (state.buf.version, state.buf.length)

    def forget(self, states: Sequence[StreamingAttention]) -> None:
        """Rows of ``states`` no longer match them (their step failed)."""
        for state in states:
            row = self._row_of.get(id(state))
            if row is not None:
                self._synced[row] = None

    def _reserve(self, n_rows: int, slots: int) -> None:
        free = sum(h is None for h in self._holder)
        rows = self.n_rows + max(0, n_rows - free)
        cap = self.keys.shape[3]
        if rows == self.n_rows and slots <= cap:
            return
        new_cap = max(cap, slots) if slots <= cap else max(slots, 2 * cap, 256)
        l, r, h, c, d = self.keys.shape
        for name in ("keys", "values"):
            old = getattr(self, name)
            grown = torch.zeros((l, rows, h, new_cap, d), dtype=old.dtype)
            grown[:, :r, :, :c] = old
            setattr(self, name, grown)
        self._holder += [None] * (rows - r)
        self._synced += [None] * (rows - r)

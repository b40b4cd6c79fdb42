"""What the kernel benchmarks compare: the patterns, the memory setup, and FLOP counting.

Shared by memllm_kernels.bench_cpu and memllm_kernels.bench_gpu so both time the same things.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from memllm_kernels import patterns as P
from memllm_kernels.patterns import Pattern, visible


@dataclass(frozen=True)
class MemorySetup:
    """Memory attention over one long sequence, InfLLM style: each query chunk attends sinks + window
    of its own past plus ``n_sel`` blocks retrieved from further back (here drawn at random: the
    kernel's cost does not depend on which blocks)."""

    n_sinks: int = 64
    window: int = 2048
    chunk: int = 512
    block: int = 128
    n_sel: int = 16

    @property
    def local(self) -> Pattern:
        return P.sinks_window(self.n_sinks, self.window)

    @property
    def name(self) -> str:
        return f"memory(s{self.n_sinks}+w{self.window}+{self.n_sel}x{self.block})"

    def inputs(self, k: torch.Tensor, v: torch.Tensor, seed: int = 0):
        """(pool_k, pool_v, block_ids (1, n_chunks, n_sel)) for k, v (1, Hkv, T, D), T % block == 0.

        The pool is the sequence's own keys seen as blocks: a strided view, nothing copied.
        """
        t = k.shape[2]
        if k.shape[0] != 1 or t % self.block:
            raise ValueError(f"memory bench needs batch 1 and T % {self.block} == 0, got {tuple(k.shape)}")
        pool_k = k[0].unflatten(1, (t // self.block, self.block)).transpose(0, 1)  # (n_blocks, Hkv, bs, D)
        pool_v = v[0].unflatten(1, (t // self.block, self.block)).transpose(0, 1)
        n_chunks = -(-t // self.chunk)
        ids = torch.full((1, n_chunks, self.n_sel), -1, dtype=torch.int32)
        gen = torch.Generator().manual_seed(seed)
        first = -(-self.n_sinks // self.block)
        for c in range(n_chunks):
            last = (c * self.chunk - self.window) // self.block - 1  # blocks wholly out of the window
            if last >= first:
                picks = torch.randperm(last - first + 1, generator=gen)[: self.n_sel] + first
                ids[0, c, : len(picks)] = picks.int()
        return pool_k, pool_v, ids.to(k.device)

    def visible_pairs(self, t: int) -> int:
        """Query-key pairs scored: the local pattern's plus n_sel * block per query with memory."""
        first = -(-self.n_sinks // self.block)
        ids_per_chunk = [
            min(self.n_sel, max(0, (c * self.chunk - self.window) // self.block - first))
            for c in range(-(-t // self.chunk))
        ]
        mem = sum(n * self.block * min(self.chunk, t - c * self.chunk) for c, n in enumerate(ids_per_chunk))
        return visible_pairs(self.local, t) + mem


def bench_patterns(window: int = 2048, n_global: int = 64, stride: int = 1024) -> list[Pattern]:
    """The compared patterns, at sizes in the spirit of their papers relative to an 8K trained window."""
    return [
        P.full(),
        P.sliding_window(window),
        P.longformer(window, n_global),
        P.bigbird(window, n_global, 3, random_block=128),
        P.strided(stride),
        P.fixed(stride, 128),
    ]


def visible_pairs(pattern: Pattern, t: int, device: str | torch.device = "cpu", rows: int = 2048) -> int:
    """Exact count of visible (query, key) pairs for Tq = Tk = t (O(t^2) work in row chunks)."""
    if pattern.is_full and not pattern.n_random:
        return t * (t + 1) // 2
    keys = torch.arange(t, device=device)[None, :]
    table = P.random_table(pattern, t, device) if pattern.n_random else None
    total = 0
    for r0 in range(0, t, rows):
        pos = torch.arange(r0, min(r0 + rows, t), device=device)[:, None]
        total += int(visible(pattern, pos, keys, table).sum())
    return total


def attention_flops(pairs: int, n_q_heads: int, head_dim: int, batch: int = 1) -> float:
    """Forward FLOPs for ``pairs`` scored query-key pairs: 2*D for QK^T plus 2*D for PV, per head."""
    return 4.0 * head_dim * pairs * n_q_heads * batch

"""Shapes of memory blocks, shared by the engine (writer/reader) and the storage layer.

A *block* is a run of at most ``block_size`` consecutive tokens of one owner's token stream
(a document, a chat session, the evicted past of one input). For every memory layer it holds the
tokens' keys **before RoPE** and their values, plus ``representatives`` key vectors that FAISS
indexes. Representative vectors concatenate the kv heads, so one inner-product search against a
query made of the per-kv-head sums of a GQA group's queries scores all heads at once::

    q_search[h*D:(h+1)*D] = sum(q[g] for g in group(h))       # (Hkv*D,)
    q_search . rep = sum_g q[g] . k[kv(g)]                     # = summed attention logits
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockLayout:
    """Geometry of every block of one memory (all blocks of an owner share it)."""

    layers: tuple[int, ...]  # model layer indices that keep memory, ascending
    n_kv_heads: int
    head_dim: int
    block_size: int
    representatives: int

    @property
    def search_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def layer_slot(self, layer: int) -> int:
        """Position of model layer ``layer`` inside ``layers`` (KeyError if it keeps no memory)."""
        try:
            return self.layers.index(layer)
        except ValueError:
            raise KeyError(f"layer {layer} keeps no memory (memory layers: {self.layers})") from None

    def bytes_per_token(self, payload_itemsize: int = 2) -> int:
        """Payload bytes per token (keys + values, all memory layers), excluding representatives."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * payload_itemsize


@dataclass
class MemoryBlock:
    """One block's payload.

    keys, values:     (L, Hkv, n, D) float16, pre-RoPE, n = token_end - token_start <= block_size
    representatives:  (L, R, Hkv*D) float32, the vectors indexed for this block at each memory layer
    token_start/end:  the block's half-open span in its owner's token stream
    """

    keys: np.ndarray
    values: np.ndarray
    representatives: np.ndarray
    token_start: int
    token_end: int

    def __post_init__(self) -> None:
        n = self.token_end - self.token_start
        if self.keys.shape != self.values.shape or self.keys.ndim != 4 or self.keys.shape[2] != n:
            raise ValueError(f"keys {self.keys.shape} / values {self.values.shape} do not match span length {n}")
        if self.representatives.ndim != 3 or self.representatives.shape[0] != self.keys.shape[0]:
            raise ValueError(f"representatives {self.representatives.shape} do not match keys {self.keys.shape}")

    @property
    def length(self) -> int:
        return self.token_end - self.token_start


@dataclass
class FetchedBlocks:
    """Payloads of several blocks at one layer, padded to block_size.

    keys, values: (n_blocks, Hkv, block_size, D) float16 (zeros past each length)
    lengths:      (n_blocks,) int64
    spans:        (n_blocks, 2) int64 token spans in each block's owner stream
    """

    keys: np.ndarray
    values: np.ndarray
    lengths: np.ndarray
    spans: np.ndarray

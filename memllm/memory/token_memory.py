"""Token-level kNN memory (the Memorizing Transformers mode), for comparison with block memory.

At a few layers, every token that leaves the local window keeps its pre-RoPE key and value; each
query token retrieves its own top-k past tokens by inner product (kv heads concatenated, query =
per-group sums, as for blocks) and attends to them in the same softmax as the local window.
Memorizing Transformers used one layer and a trained gate; here it is training-free, with memory
keys seen at one fixed RoPE distance like block memory.
"""

from __future__ import annotations

import faiss
import torch


class TokenMemory:
    """Per memorizing layer: keys/values (Hkv, N, D) of every evicted token and a flat IP index."""

    def __init__(self, layers: tuple[int, ...], n_kv_heads: int, head_dim: int) -> None:
        self.layers = layers
        self.n_kv_heads, self.head_dim = n_kv_heads, head_dim
        self._keys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        self._values: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
        self._cat: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._index = {layer: faiss.IndexFlatIP(n_kv_heads * head_dim) for layer in layers}

    def __len__(self) -> int:
        return int(self._index[self.layers[0]].ntotal) if self.layers else 0

    def add(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values: (Hkv, n, D) pre-RoPE."""
        self._keys[layer].append(keys.to(torch.float16))
        self._values[layer].append(values.to(torch.float16))
        self._cat.pop(layer, None)
        flat = keys.float().permute(1, 0, 2).reshape(keys.shape[1], -1).contiguous().numpy()  # (n, Hkv*D)
        self._index[layer].add(flat)

    def _tensors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self._cat:
            self._cat[layer] = (torch.cat(self._keys[layer], 1), torch.cat(self._values[layer], 1))
        return self._cat[layer]

    def attend(self, layer: int, q_search: torch.Tensor, q_mem: torch.Tensor, k: int, scale: float):
        """Each query's own top-k tokens, one softmax each; returns (out, lse) to merge with local.

        q_search: (T, Hkv*D) float32 group-summed pre-RoPE queries; q_mem: (1, Hq, T, D) queries rotated
        for memory. Returns out (1, Hq, T, D) in q_mem's dtype and lse (1, Hq, T) float32.
        """
        t = q_search.shape[0]
        k = min(k, len(self))
        _, idx = self._index[layer].search(q_search.numpy(), k)  # (T, k)
        keys, values = self._tensors(layer)  # (Hkv, N, D)
        sel = torch.from_numpy(idx).reshape(-1)
        kk = keys[:, sel].view(self.n_kv_heads, t, k, self.head_dim).float()  # (Hkv, T, k, D)
        vv = values[:, sel].view(self.n_kv_heads, t, k, self.head_dim).float()
        hq = q_mem.shape[1]
        g = hq // self.n_kv_heads
        qg = q_mem[0].float().view(self.n_kv_heads, g, t, self.head_dim)  # (Hkv, G, T, D)
        scores = torch.einsum("hgtd,htkd->hgtk", qg, kk) * scale
        lse = torch.logsumexp(scores, dim=-1)  # (Hkv, G, T)
        out = torch.einsum("hgtk,htkd->hgtd", torch.exp(scores - lse.unsqueeze(-1)), vv)
        return out.reshape(1, hq, t, self.head_dim).to(q_mem.dtype), lse.reshape(1, hq, t)

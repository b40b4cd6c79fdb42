"""A Llama-family decoder (Llama, Mistral, Qwen2, SmolLM) in one short file, gpt-fast style.

The model knows nothing about caches, positions or memory: every layer computes its queries, keys
and values **before RoPE** and hands them to ``attn.attend(layer, q, k, v)``; the attention state
(memllm/attention.py: full cache, sliding window, kNN memory) rotates, stores and attends.

Shapes: B batch, T new tokens, Hq query heads, Hkv kv heads, D head dim, C hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn


class AttentionState(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B, Hq, T, D), k/v (B, Hkv, T, D), all pre-RoPE -> (B, Hq, T, D)."""
        ...


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    hidden_dim: int
    norm_eps: float
    max_positions: int
    tie_embeddings: bool
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_hf(cls, cfg) -> ModelConfig:
        """From a transformers LlamaConfig / MistralConfig / Qwen2Config."""
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        qkv_bias = bool(getattr(cfg, "attention_bias", False)) or cfg.model_type == "qwen2"
        return cls(
            vocab_size=cfg.vocab_size,
            dim=cfg.hidden_size,
            n_layers=cfg.num_hidden_layers,
            n_heads=cfg.num_attention_heads,
            n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
            head_dim=head_dim,
            hidden_dim=cfg.intermediate_size,
            norm_eps=cfg.rms_norm_eps,
            max_positions=cfg.max_position_embeddings,
            tie_embeddings=bool(getattr(cfg, "tie_word_embeddings", False)),
            attention_bias=qkv_bias,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, qkv, bias=cfg.attention_bias)  # fused q, k, v projections
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, layer: int, attn: AttentionState) -> torch.Tensor:
        b, t, _ = x.shape
        hq, hkv, d = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.wqkv(x).split([hq * d, hkv * d, hkv * d], dim=-1)
        q = q.view(b, t, hq, d).transpose(1, 2)  # (B, Hq, T, D)
        k = k.view(b, t, hkv, d).transpose(1, 2)  # (B, Hkv, T, D)
        v = v.view(b, t, hkv, d).transpose(1, 2)  # (B, Hkv, T, D)
        out = attn.attend(layer, q, k, v)  # (B, Hq, T, D)
        return self.wo(out.transpose(1, 2).reshape(b, t, hq * d))


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.hidden = cfg.hidden_dim
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.hidden_dim, bias=cfg.mlp_bias)  # fused gate and up
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.w13(x).split(self.hidden, dim=-1)
        return self.w2(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, layer: int, attn: AttentionState) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), layer, attn)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.embed.weight

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    def forward(
        self, tokens: torch.Tensor, attn: AttentionState, last_only: bool = False, keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, V) float32; (B, 1, V) with ``last_only``; (B, K, V)
        for the K positions along T listed in ``keep`` (only those go through the output head)."""
        x = self.embed(tokens)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, i, attn)
        if last_only:
            x = x[:, -1:]
        elif keep is not None:
            x = x[:, keep]
        return self.output(self.norm(x)).float()

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Assign weights from a transformers Llama-family state dict (q/k/v and gate/up fused here)."""
        cfg = self.config
        ours: dict[str, torch.Tensor] = {"embed.weight": sd["model.embed_tokens.weight"]}
        ours["norm.weight"] = sd["model.norm.weight"]
        ours["output.weight"] = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
        for i in range(cfg.n_layers):
            p = f"model.layers.{i}."
            a = p + "self_attn."
            ours[f"layers.{i}.attention_norm.weight"] = sd[p + "input_layernorm.weight"]
            ours[f"layers.{i}.ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
            ours[f"layers.{i}.attention.wqkv.weight"] = torch.cat(
                [sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]]
            )
            if cfg.attention_bias:
                ours[f"layers.{i}.attention.wqkv.bias"] = torch.cat(
                    [sd[a + "q_proj.bias"], sd[a + "k_proj.bias"], sd[a + "v_proj.bias"]]
                )
            ours[f"layers.{i}.attention.wo.weight"] = sd[a + "o_proj.weight"]
            m = p + "mlp."
            ours[f"layers.{i}.feed_forward.w13.weight"] = torch.cat(
                [sd[m + "gate_proj.weight"], sd[m + "up_proj.weight"]]
            )
            ours[f"layers.{i}.feed_forward.w2.weight"] = sd[m + "down_proj.weight"]
            if cfg.mlp_bias:
                ours[f"layers.{i}.feed_forward.w13.bias"] = torch.cat(
                    [sd[m + "gate_proj.bias"], sd[m + "up_proj.bias"]]
                )
                ours[f"layers.{i}.feed_forward.w2.bias"] = sd[m + "down_proj.bias"]
        if cfg.tie_embeddings:
            ours.pop("output.weight")
        missing, unexpected = self.load_state_dict(ours, strict=False, assign=True)
        missing = [k for k in missing if not (cfg.tie_embeddings and k == "output.weight")]
        if missing or unexpected:
            raise ValueError(f"weights do not fit the model: missing {missing}, unexpected {unexpected}")
        if cfg.tie_embeddings:
            self.output.weight = self.embed.weight

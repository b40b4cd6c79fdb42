"""Rotary position embedding (the HF "rotate half" convention used by Llama-family checkpoints).

Keys are stored before RoPE everywhere in memllm; whoever attends rotates queries and keys at the
positions it chooses (true positions, compact local positions, or one fixed distance for memory).
"""

from __future__ import annotations

import torch


def rope_inv_freq(hf_config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (D/2,) float32 and the cos/sin scaling factor for a transformers config.

    Supports the config's rope type (default, linear, llama3, yarn, ...) through transformers'
    own initialisers so scaled checkpoints rotate exactly as they were trained.
    """
    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config)
        return inv_freq.float(), float(scaling)
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    return inv_freq, 1.0


class Rope:
    """cos/sin tables for integer positions; ``rotate`` applies them.

    inv_freq: (D/2,) float32. Tables are computed in float32 and cast to the activation dtype,
    matching transformers bit for bit.
    """

    def __init__(self, inv_freq: torch.Tensor, scaling: float = 1.0) -> None:
        self.inv_freq = inv_freq.float()
        self.scaling = scaling

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions: (T,) or (B, T) integer -> cos, sin of shape positions.shape + (D,)."""
        freqs = positions.float().unsqueeze(-1) * self.inv_freq.to(positions.device)  # (..., T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, D)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    @staticmethod
    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, D); cos/sin: (T, D) or (B, T, D). Returns x rotated, same shape and dtype."""
        if cos.dim() == 3:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate x (B, H, T, D) at positions (T,) or (B, T)."""
        cos, sin = self.cos_sin(positions, x.dtype)
        return self.rotate(x, cos, sin)

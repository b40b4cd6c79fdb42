"""Pieces shared by the Triton kernels: the import guard, the pattern rule and the online softmax step.

Importing this module never fails: without triton, ``HAS_TRITON`` is False and the jit helpers are
absent (the kernel modules then define nothing and their host functions raise ``RuntimeError``).
Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU tensors.

Host-side helpers here check what the kernels support: float16 / bfloat16 tensors, head_dim a
power of two in [16, 256] (64 and 128 are the tuned sizes), on CUDA or under the interpreter.
"""

from __future__ import annotations

import os

import torch

try:  # pragma: no cover - depends on the machine
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover
    triton = None
    tl = None
    HAS_TRITON = False

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
LOG2E = 1.4426950408889634


def interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def unsupported_reason(q: torch.Tensor) -> str | None:
    """Why the Triton kernels cannot serve these tensors, or None if they can."""
    if not HAS_TRITON:
        return "triton is not installed"
    if not q.is_cuda and not interpreting():
        return f"tensors are on {q.device.type} and TRITON_INTERPRET is not set"
    if q.dtype not in SUPPORTED_DTYPES:
        return f"dtype {q.dtype} (the Triton kernels take float16 / bfloat16)"
    d = q.shape[-1]
    if d < 16 or d > 256 or d & (d - 1):
        return f"head_dim {d} (the Triton kernels take a power of two in [16, 256])"
    return None


def require_supported(q: torch.Tensor) -> None:
    """Raise RuntimeError with the reason when the Triton kernels cannot serve ``q``."""
    reason = unsupported_reason(q)
    if reason is not None:
        raise RuntimeError(f"Triton attention backend unavailable: {reason}")


def needs_upcast(dtype: torch.dtype) -> bool:
    """Whether the kernels must multiply in float32 (bfloat16 under the 3.9 interpreter; see mma)."""
    return interpreting() and dtype == torch.bfloat16


def default_tiles(head_dim: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per head_dim; small tiles under the interpreter."""
    if interpreting():
        return 16, 16, 1, 1
    if head_dim <= 64:
        return 128, 64, 4, 3
    return 128, 64, 8, 2


if HAS_TRITON:

    @triton.jit
    def visible_tile(
        pos,
        kj,
        rand_ptr,
        n_rand_rows,
        WINDOW,
        STRIDE,
        SUMMARY,
        N_GLOBAL,
        RAND_BLOCK,
        KIND: tl.constexpr,
        HAS_GLOBAL: tl.constexpr,
        N_RANDOM: tl.constexpr,
    ):
        """memllm_kernels.patterns.visible on a tile: pos (BLOCK_M,) query positions, kj (BLOCK_N,) key indices."""
        p = pos[:, None]
        j = kj[None, :]
        d = p - j
        if KIND == 0:
            local = d >= 0
        elif KIND == 1:
            local = d < WINDOW
        elif KIND == 2:
            local = (d < STRIDE) | (d % STRIDE == 0)
        else:
            local = (j // STRIDE == p // STRIDE) | (j % STRIDE >= STRIDE - SUMMARY)
        if HAS_GLOBAL:
            local = local | (j < N_GLOBAL) | (p < N_GLOBAL)
        if N_RANDOM > 0:
            row = tl.minimum(pos // RAND_BLOCK, n_rand_rows - 1)
            kblk = (kj // RAND_BLOCK)[None, :]
            for t in tl.static_range(N_RANDOM):
                r = tl.load(rand_ptr + row * N_RANDOM + t)
                local = local | (r[:, None] == kblk)
        return (d >= 0) & local

    @triton.jit
    def mma(a, b, UPCAST: tl.constexpr):
        """tl.dot with a float32 accumulator; UPCAST multiplies in float32 (exact for 16-bit inputs).

        UPCAST exists for the interpreter only: Triton 3.9's interpreter multiplies bfloat16 operands
        as their raw uint16 bits. On GPUs it is always False.
        """
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            return tl.dot(a, b)

    @triton.jit
    def online_softmax_step(acc, m_i, l_i, s, v, UPCAST: tl.constexpr):
        """Fold one tile of base-2 logits s (BLOCK_M, BLOCK_N) (-inf = hidden) and values v into the state."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + mma(p.to(v.dtype), v, UPCAST)
        return acc, m_new, l_i

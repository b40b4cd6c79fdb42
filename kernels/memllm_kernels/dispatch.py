"""One entry for attention and one for memory attention; they pick the backend.

Backends (each implements the contract of memllm_kernels.reference):

- ``reference``: dense torch (memllm_kernels.reference), O(Tq * Tk) memory; the spec.
- ``blocked``:   block-sparse torch loop (memllm_kernels.cpu_blocked); any device, any float dtype.
- ``triton``:    Triton kernels (memllm_kernels.triton_block_sparse / memllm_kernels.triton_memory); CUDA tensors
                 (or CPU tensors under TRITON_INTERPRET=1), float16 / bfloat16, head_dim 16..256.

Choice, first match wins: the ``backend=`` argument; the innermost ``use_backend(...)`` context; the
environment variable ``MEMLLM_KERNEL_BACKEND`` (read once per process; ``auto`` or empty = unset);
otherwise ``auto``: triton for CUDA tensors it can serve, else blocked. When auto passes over triton
for CUDA tensors it logs why; a backend named explicitly that cannot serve raises RuntimeError (no
silent fallback). Each (backend, reason) choice is logged once at INFO on logger ``kernels``.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import threading
from collections.abc import Iterator

import torch

from memllm_kernels.common import AttentionOutput, MemoryAttentionOutput, normalize_block_ids
from memllm_kernels.patterns import Pattern, full

log = logging.getLogger("memllm_kernels")

BACKENDS = ("reference", "blocked", "triton")
ENV_VAR = "MEMLLM_KERNEL_BACKEND"

_override: contextvars.ContextVar[str | None] = contextvars.ContextVar("memllm_kernel_backend", default=None)
_logged: set[tuple[str, str, str]] = set()
_logged_lock = threading.Lock()


def _validate(name: str, source: str) -> str:
    if name not in (*BACKENDS, "auto"):
        expected = (*BACKENDS, "auto")
        raise ValueError(f"unknown kernel backend {name!r} from {source}; expected one of {expected}")
    return name


@functools.cache
def env_backend() -> str | None:
    """The backend named by MEMLLM_KERNEL_BACKEND, read once (None when unset, empty or 'auto')."""
    raw = os.environ.get(ENV_VAR, "").strip().lower()
    if raw in ("", "auto"):
        return None
    return _validate(raw, ENV_VAR)


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Within this block (this thread / task), memllm_kernels.attention and memory_attention use ``name``."""
    token = _override.set(_validate(name, "use_backend"))
    try:
        yield
    finally:
        _override.reset(token)


def _log_once(op: str, backend: str, why: str) -> None:
    key = (op, backend, why)
    with _logged_lock:
        if key in _logged:
            return
        _logged.add(key)
    log.info("memllm_kernels.%s: using the %s backend (%s)", op, backend, why)


def _triton_reason(q: torch.Tensor, memory_chunking: tuple[int, int] | None = None) -> str | None:
    from memllm_kernels.triton_common import unsupported_reason

    reason = unsupported_reason(q)
    if reason is None and memory_chunking is not None:
        chunk, n_chunks = memory_chunking
        if n_chunks > 1 and chunk % 16:
            reason = f"memory chunk_size {chunk} is not a multiple of 16"
    return reason


def choose_backend(q: torch.Tensor, backend: str | None = None, op: str = "attention", memory_chunking=None) -> str:
    """The backend that will serve ``q`` (see the module docstring for the order of choice)."""
    if backend is not None:
        name, source = _validate(backend, "argument"), "argument"
    elif _override.get() is not None:
        name, source = _override.get(), "use_backend"
    elif env_backend() is not None:
        name, source = env_backend(), ENV_VAR
    else:
        name, source = "auto", "auto"
    if name == "triton":
        reason = _triton_reason(q, memory_chunking)
        if reason is not None:
            raise RuntimeError(f"kernel backend 'triton' requested by {source} cannot serve: {reason}")
    if name != "auto":
        _log_once(op, name, f"chosen by {source}")
        return name
    if q.is_cuda:
        reason = _triton_reason(q, memory_chunking)
        if reason is None:
            _log_once(op, "triton", "auto: CUDA tensors")
            return "triton"
        _log_once(op, "blocked", f"auto: triton cannot serve: {reason}")
        return "blocked"
    _log_once(op, "blocked", f"auto: {q.device.type} tensors")
    return "blocked"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pattern: Pattern | None = None,
    *,
    scale: float | None = None,
    return_key_mass: bool = False,
    backend: str | None = None,
) -> AttentionOutput:
    """Attention of q (B, Hq, Tq, D) over k, v (B, Hkv, Tk, D) under ``pattern`` (default causal full).

    Returns AttentionOutput(out (B, Hq, Tq, D) q.dtype, lse (B, Hq, Tq) float32, key_mass
    (B, Hkv, Tk) float32 or None). Queries are the last Tq positions (see memllm_kernels.patterns).
    """
    pattern = full() if pattern is None else pattern
    name = choose_backend(q, backend, "attention")
    if name == "reference":
        from memllm_kernels.reference import pattern_attention

        return pattern_attention(q, k, v, pattern, scale, return_key_mass)
    if name == "blocked":
        from memllm_kernels.cpu_blocked import blocked_attention

        return blocked_attention(q, k, v, pattern, scale, return_key_mass)
    from memllm_kernels.triton_block_sparse import triton_attention

    return triton_attention(q, k, v, pattern, scale, return_key_mass)


def memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    block_ids: torch.Tensor,
    *,
    local: Pattern,
    q_mem: torch.Tensor | None = None,
    pool_lens: torch.Tensor | None = None,
    chunk_size: int | None = None,
    scale: float | None = None,
    return_key_mass: bool = False,
    backend: str | None = None,
) -> MemoryAttentionOutput:
    """One softmax over retrieved memory blocks and local keys (contract: reference.memory_attention).

    pool_k, pool_v (n_blocks, Hkv, bs, D); block_ids (B, n_sel), (B, n_chunks, n_sel) or
    (B, Hkv, n_chunks, n_sel), -1 = none; q_mem scores memory keys (default q).
    """
    ids, chunk = normalize_block_ids(block_ids, q.shape[0], k.shape[1], q.shape[2], chunk_size)
    name = choose_backend(q, backend, "memory_attention", (chunk, ids.shape[2]))
    kwargs = dict(
        local=local,
        q_mem=q_mem,
        pool_lens=pool_lens,
        chunk_size=chunk,
        scale=scale,
        return_key_mass=return_key_mass,
    )
    if name == "reference":
        from memllm_kernels.reference import memory_attention as impl
    elif name == "blocked":
        from memllm_kernels.cpu_blocked import blocked_memory_attention as impl
    else:
        from memllm_kernels.triton_memory import triton_memory_attention as impl
    return impl(q, k, v, pool_k, pool_v, ids, **kwargs)

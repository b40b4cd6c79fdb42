"""Attention kernels: a torch reference (the spec), a block-sparse torch path and Triton kernels for GPUs.

Entry points: :func:`attention` (any pattern of memllm_kernels.patterns) and :func:`memory_attention`
(retrieved blocks + local keys in one softmax); both pick a backend (memllm_kernels.dispatch). Importing
this package never imports triton.
"""

from memllm_kernels.common import AttentionOutput, MemoryAttentionOutput
from memllm_kernels.dispatch import BACKENDS, attention, choose_backend, memory_attention, use_backend
from memllm_kernels.layouts import SparseLayout, build_layout
from memllm_kernels.patterns import (
    Pattern,
    bigbird,
    fixed,
    full,
    longformer,
    sinks_window,
    sliding_window,
    strided,
    token_mask,
)
from memllm_kernels.reference import attention_with_lse, block_mass, expand_kv, merge_attention

__all__ = [
    "BACKENDS",
    "AttentionOutput",
    "MemoryAttentionOutput",
    "Pattern",
    "SparseLayout",
    "attention",
    "attention_with_lse",
    "bigbird",
    "block_mass",
    "build_layout",
    "choose_backend",
    "expand_kv",
    "fixed",
    "full",
    "longformer",
    "memory_attention",
    "merge_attention",
    "sinks_window",
    "sliding_window",
    "strided",
    "token_mask",
    "use_backend",
]

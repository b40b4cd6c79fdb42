"""Benchmark helpers: size specs, Gutenberg stripping, and the machine a result was measured on."""

from __future__ import annotations

import pytest

from memllm.bench.common import machine_info, parse_sizes, strip_gutenberg
from memllm.loading import cpu_has_fast_bf16, parse_dtype
from memllm.settings import get_settings


def test_parse_sizes():
    assert parse_sizes("8k, 16K,512,") == [8192, 16384, 512]
    with pytest.raises(ValueError):
        parse_sizes("lots")


def test_strip_gutenberg_keeps_the_body_only():
    text = "header\n*** START OF THE BOOK ***\nCall me Ishmael.\n*** END OF THE BOOK ***\nlicence"
    assert strip_gutenberg(text) == "Call me Ishmael."


def test_machine_info_names_the_dtype_and_the_cpus_matrix_extensions():
    info = machine_info()
    # the dtype the settings resolve to ("auto": bfloat16 exactly where the CPU has native bf16 products)
    assert info["dtype"] == str(parse_dtype(get_settings().dtype)).removeprefix("torch.")
    assert info["dtype"] in ("bfloat16", "float32")
    assert ("avx512_bf16" in info["cpu_extensions"] or "amx_bf16" in info["cpu_extensions"]) == cpu_has_fast_bf16()
    assert info["cpu_model"] and info["threads"] >= 1

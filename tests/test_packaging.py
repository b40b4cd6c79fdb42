"""Our top-level ``kernels`` package must not be mistaken for Hugging Face's kernel hub."""

from __future__ import annotations

import importlib.metadata

import kernels


def test_transformers_does_not_take_our_kernels_for_the_hub():
    from transformers.utils import import_utils

    assert import_utils.is_kernels_available() is False


def test_our_packages_come_from_this_distribution():
    dist = importlib.metadata.distribution("memllm")
    assert dist.metadata["Name"] == "memllm"
    assert hasattr(kernels, "attention_with_lse")
    top = (dist.read_text("top_level.txt") or "").split()
    if top:  # editable installs may not record it
        assert {"memllm", "storage", "kernels", "api"} <= set(top)


def test_settings_read_from_environment(tmp_path):
    from memllm.settings import Settings

    s = Settings.from_env({"MEMLLM_DATA_DIR": str(tmp_path), "MEMLLM_MEMORY_TOP_K": "7", "MEMLLM_DTYPE": "float32"})
    assert s.data_dir == tmp_path and s.memory.top_k == 7 and s.dtype == "float32"
    assert s.resolved_database_url.endswith(str(tmp_path / "memllm.db"))
    import pytest

    with pytest.raises(ValueError, match="MEMLLM_MEMORY_TOP_K"):
        Settings.from_env({"MEMLLM_MEMORY_TOP_K": "lots"})

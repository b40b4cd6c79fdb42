"""Shared fixtures: the tiny random model (fast) and the real bundled model (loaded once)."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def real_model():
    from memllm.testing import real_model as load

    return load("float32")


@pytest.fixture(scope="session")
def tiny():
    from memllm.testing import tiny_loaded_model

    return tiny_loaded_model()

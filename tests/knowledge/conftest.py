"""Fixtures for the knowledge-base tests: one tiny random model per session, a fresh service (real
SQLite file, real FAISS, real sentence embedder) per test."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from kb_helpers import service_at, tiny_engine

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def kb_engine():
    return tiny_engine()


@pytest.fixture
async def svc(tmp_path, kb_engine):
    async with service_at(tmp_path / "data", kb_engine) as service:
        await service.create_kb("kb")
        yield service

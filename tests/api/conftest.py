"""API tests run against real ``memllm serve`` processes (tests/api/server_process.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from server_process import ServerProcess


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for a test module: loopback, no auth, the demo knowledge base, small limits."""
    data_dir = tmp_path_factory.mktemp("api-server") / "data"
    env = {"MEMLLM_API_MAX_OUTPUT_TOKENS": "64", "MEMLLM_API_DEFAULT_MAX_TOKENS": "16"}
    with ServerProcess(data_dir, env) as proc:
        yield proc

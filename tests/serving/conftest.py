"""Fixtures for the serving tests: the tiny random model as an engine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from serving_helpers import tiny_engine


@pytest.fixture(scope="session")
def engine(tiny):
    return tiny_engine(tiny)

"""A real ``memllm serve`` process on loopback for the API tests (the real bundled model).

The converted model is shared with the other real-model tests through a symlink into the test data
dir, so a server starts in seconds once the model was converted. The process logic is
:class:`memllm_api.local_server.LocalServer`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from memllm.testing import test_data_dir
from memllm_api.local_server import LocalServer, link_models, memllm_command

START_TIMEOUT_S = 240  # the first start may convert the bundled model

__all__ = ["ServerProcess", "memllm_command", "prepare_data_dir", "wait_ready"]


def prepare_data_dir(data_dir: Path) -> Path:
    """A data dir whose ``models`` folder is the shared converted-model cache."""
    return link_models(data_dir, test_data_dir() / "models")


class ServerProcess(LocalServer):
    """``with ServerProcess(data_dir, env) as server: server.url`` (stops it on exit)."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        super().__init__(
            data_dir, models_dir=test_data_dir() / "models", env=env, args=args, start_timeout_s=START_TIMEOUT_S
        )


def wait_ready(client: Any, kb_id: int, doc_id: int, timeout_s: float = 120) -> dict[str, Any]:
    """Poll a document (``client``: an httpx.Client on the server) until it is ready or failed."""
    deadline = time.monotonic() + timeout_s
    doc: dict[str, Any] = {}
    while time.monotonic() < deadline:
        doc = client.get(f"/api/kbs/{kb_id}/documents/{doc_id}").json()
        if doc["status"] in ("ready", "error"):
            return doc
        time.sleep(0.3)
    raise AssertionError(f"document {doc_id} not ready: {doc}")

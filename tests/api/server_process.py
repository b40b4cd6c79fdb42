"""A real ``memllm serve`` process on loopback for the API tests (the real bundled model).

The converted model is shared with the other real-model tests through a symlink into the test data
dir, so a server starts in seconds once the model was converted.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from memllm.testing import test_data_dir

START_TIMEOUT_S = 240  # the first start may convert the bundled model


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(base: str) -> tuple[int | None, str]:
    """(status code or None when nothing answers, body)."""
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError:
        return None, ""


def memllm_command() -> list[str]:
    exe = Path(sys.executable).parent / "memllm"
    if exe.exists():
        return [str(exe)]
    return [shutil.which("memllm") or "memllm"]


def prepare_data_dir(data_dir: Path) -> Path:
    """A data dir whose ``models`` folder is the shared converted-model cache."""
    data_dir.mkdir(parents=True, exist_ok=True)
    models = test_data_dir() / "models"
    models.mkdir(parents=True, exist_ok=True)
    link = data_dir / "models"
    if not link.exists():
        link.symlink_to(models, target_is_directory=True)
    return data_dir


class ServerProcess:
    """``with ServerProcess(data_dir, env) as server: server.url`` (stops it on exit)."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> None:
        self.data_dir = prepare_data_dir(data_dir)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir / f"server-{self.port}.log"
        self.extra_env = env or {}
        self.args = args
        self.proc: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEMLLM_")}
        env.update({"MEMLLM_DATA_DIR": str(self.data_dir), "PYTHONUNBUFFERED": "1", **self.extra_env})
        cmd = [*memllm_command(), "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.log()}")
            status, body = health(self.url)
            if status == 200:
                return self
            if status == 503 and '"status":"error"' in body.replace(" ", ""):
                self.stop()
                raise RuntimeError(f"the server failed to start: {body}\n{self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"no 200 from /health within {START_TIMEOUT_S} s:\n{self.log()}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def log(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

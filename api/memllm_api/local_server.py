"""A ``memllm serve`` process on a free loopback port, for benchmarks and tests.

``with LocalServer(data_dir, models_dir=...) as server: server.url``. The ``models`` folder of its
data dir links to ``models_dir`` so the converted model is shared (no second conversion). Start
waits for ``GET /health`` to answer 200 and fails at once when the server exits or reports that it
could not start.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

START_TIMEOUT_S = 600.0  # a first start may convert the bundled model


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(base: str, timeout: float = 5.0) -> tuple[int | None, str]:
    """(status of ``GET {base}/health`` or None when nothing answers, body)."""
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError:
        return None, ""


def memllm_command() -> list[str]:
    """The ``memllm`` executable beside this interpreter (a venv), else the one on PATH."""
    exe = Path(sys.executable).parent / "memllm"
    if exe.exists():
        return [str(exe)]
    found = shutil.which("memllm")
    return [found] if found else [sys.executable, "-m", "memllm.cli"]


def link_models(data_dir: Path, models_dir: Path) -> Path:
    """Create ``data_dir`` with its ``models`` folder linked to ``models_dir``; returns ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    models_dir.mkdir(parents=True, exist_ok=True)
    link = data_dir / "models"
    if not link.exists() and not link.is_symlink():
        link.symlink_to(models_dir.resolve(), target_is_directory=True)
    return data_dir


def _failed_to_start(status: int | None, body: str) -> bool:
    """/health's 503 says "error" (not "loading"): the server will not become ready."""
    if status != 503:
        return False
    try:
        return json.loads(body).get("status") == "error"
    except (ValueError, AttributeError):
        return False


class LocalServer:
    """See the module docstring.

    ``data_dir``: its data dir (default: a temporary one, removed at stop). ``env``: extra
    environment (the caller's ``MEMLLM_*`` variables are dropped unless ``inherit_memllm_env``).
    ``args``: extra ``memllm serve`` arguments (e.g. ``--no-demo``).
    """

    def __init__(
        self,
        data_dir: Path | None = None,
        *,
        models_dir: Path | None = None,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
        inherit_memllm_env: bool = False,
        start_timeout_s: float = START_TIMEOUT_S,
    ) -> None:
        self._tmp: tempfile.TemporaryDirectory | None = None
        if data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="memllm-serve-")
            data_dir = Path(self._tmp.name) / "data"
        self.data_dir = Path(data_dir)
        self.models_dir = models_dir
        self.extra_env = dict(env or {})
        self.args = tuple(args)
        self.inherit_memllm_env = inherit_memllm_env
        self.start_timeout_s = start_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.data_dir / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> LocalServer:
        if self.models_dir is not None:
            link_models(self.data_dir, self.models_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if self.inherit_memllm_env or not k.startswith("MEMLLM_")}
        env.update({"MEMLLM_DATA_DIR": str(self.data_dir), "PYTHONUNBUFFERED": "1", **self.extra_env})
        cmd = [*memllm_command(), "serve", "--host", "127.0.0.1", "--port", str(self.port), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise RuntimeError(f"the server exited with {code}:\n{self.log()}")
            status, body = health(self.url)
            if status == 200:
                return self
            if _failed_to_start(status, body) or time.monotonic() > deadline:
                log_text = self.log()
                self.stop()
                why = body if status == 503 else f"no 200 within {self.start_timeout_s:.0f} s"
                raise RuntimeError(f"{self.url}/health: {why}\n{log_text}")
            time.sleep(0.3)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def log(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Server settings, read once from ``MEMLLM_API_*`` environment variables (see memllm/settings.py)."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass

from memllm.settings import _fields_from_env

ENV_PREFIX = "MEMLLM_API_"
AUTH_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class ApiSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    auth: str = "auto"  # auto: off when bound to loopback, required otherwise | on | off (loopback only)
    max_upload_bytes: int = 20 * 1024 * 1024  # per document upload
    max_prompt_tokens: int = 131_072  # memory mode reads any length; this bounds one request's work
    max_output_tokens: int = 2048  # the largest max_tokens a request may ask for
    default_max_tokens: int = 256  # when a request gives none
    request_timeout_s: float = 600.0  # a generation running longer is stopped (finish_reason "length")
    rate_limit_per_minute: int = 600  # requests per key (or per client address without auth); 0: no limit
    max_batch: int = 16  # streams decoded together by the scheduler
    demo_kb: bool = True  # create the "demo" knowledge base from the bundled sample document at start
    migrate: bool = True  # bring the database to the code's schema at start (off: refuse an old one)
    allowed_hosts: str = ""  # Host names served (comma list, "*" all, "*.example.com"); "": loopback + bind host
    allowed_origins: str = ""  # other origins (scheme://host[:port]) whose browser pages may change state

    def __post_init__(self) -> None:
        if self.auth not in AUTH_MODES:
            raise ValueError(f"{ENV_PREFIX}AUTH={self.auth!r}: choose one of {', '.join(AUTH_MODES)}")
        if self.auth == "off" and not is_loopback(self.host):
            raise ValueError(f"authentication can be off only on a loopback address, not on {self.host!r}")

    def output_tokens(self, requested: int | None) -> int:
        """The tokens a native request may generate: its ``max_tokens`` (or the default), at most the limit."""
        return min(requested or self.default_max_tokens, self.max_output_tokens)

    @property
    def auth_required(self) -> bool:
        return self.auth == "on" or (self.auth == "auto" and not is_loopback(self.host))

    @property
    def host_allow_list(self) -> tuple[str, ...]:
        """Host names (no port, no brackets, lower case) whose requests are served; ``*`` matches all."""
        names = _split(self.allowed_hosts) or (self.host, *LOOPBACK_NAMES)
        return tuple(dict.fromkeys(n.strip("[]").rstrip(".").lower() for n in names if n))

    @property
    def origin_allow_list(self) -> frozenset[str]:
        """Origins besides the request's own that may send state-changing requests (``*``: any)."""
        return frozenset(o.rstrip("/").lower() for o in _split(self.allowed_origins))

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> ApiSettings:
        env = os.environ if environ is None else environ
        values = _fields_from_env(cls, env, ENV_PREFIX)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: object) -> ApiSettings:
        return dataclasses.replace(self, **changes)


LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def _split(spec: str) -> list[str]:
    return [part.strip() for part in spec.split(",") if part.strip()]


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

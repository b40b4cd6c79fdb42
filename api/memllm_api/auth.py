"""Who is calling: API keys map to tenants; every knowledge base and session belongs to one.

With authentication off (only allowed on loopback) every caller is the local tenant (``tenant_id``
None). With it on, ``Authorization: Bearer <key>`` is required and the key's tenant is the caller;
ids owned by another tenant answer 404, exactly like ids that do not exist.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from litestar import Request

from memllm_api.core import get_core, ready_core
from memllm_api.errors import ApiError


@dataclass(frozen=True)
class Caller:
    tenant_id: int | None  # None: the local tenant (authentication off)
    key_prefix: str | None = None

    @property
    def rate_key(self) -> str:
        return self.key_prefix or "local"


class RateLimiter:
    """A token bucket per key: ``per_minute`` requests, refilled continuously. Thread-safe."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, last refill time)
        self._lock = threading.Lock()

    def take(self, key: str) -> float:
        """0 if the request may go on, else the seconds to wait."""
        if self.per_minute <= 0:
            return 0.0
        rate = self.per_minute / 60.0
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key, (float(self.per_minute), now))
            tokens = min(float(self.per_minute), tokens + (now - last) * rate)
            if tokens < 1.0:
                self._buckets[key] = (tokens, now)
                return (1.0 - tokens) / rate
            self._buckets[key] = (tokens - 1.0, now)
            return 0.0


async def provide_caller(request: Request) -> Caller:
    """Dependency ``caller``: authenticates the request and applies the per-key rate limit."""
    core = get_core(request)
    caller = await authenticate(request) if core.api.auth_required else Caller(None)
    wait = request.app.state.rate_limiter.take(caller.rate_key if core.api.auth_required else _client(request))
    if wait > 0:
        limit = core.api.rate_limit_per_minute
        err = ApiError(429, f"rate limit of {limit} requests per minute exceeded", "rate_limit")
        err.headers = {"Retry-After": str(max(1, math.ceil(wait)))}
        raise err
    return caller


def _client(request: Request) -> str:
    return request.client.host if request.client else "local"


async def authenticate(request: Request) -> Caller:
    """The caller of ``Authorization: Bearer <key>``; 401 when the key is missing, unknown or revoked."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>' (memllm keys create)", "missing_key")
    core = ready_core(request)
    from memllm_storage.repositories import ApiKeyRepository

    async with core.store.sessions() as db:
        tenant = await ApiKeyRepository(db).authenticate(key.strip())
        await db.commit()
    if tenant is None:
        raise ApiError(401, "invalid or revoked API key", "invalid_key")
    return Caller(tenant.id, key.strip()[:10])

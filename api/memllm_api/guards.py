"""Network safety: what a web page in the user's browser must not be able to do to the API.

With authentication off (the loopback default) the API trusts whoever reaches it, and a browser on
the same machine reaches it for any web site it visits. These app-wide Litestar guards run before a
handler reads its body or authenticates, and refuse in the API's error shape:

* a ``Host`` not in the allow-list (DNS rebinding): 400 ``host_not_allowed``;
* ``X-Forwarded-For`` / ``Forwarded`` / ``X-Real-IP`` with auth off (a proxy makes the server
  reachable from everywhere; it must turn auth on): 403 ``proxied_without_auth``;
* a state-changing request from another site (``Sec-Fetch-Site: cross-site`` or an ``Origin`` other
  than the request's own and not in ``MEMLLM_API_ALLOWED_ORIGINS``), and with auth off a cross-site
  read of data under ``/api``, ``/v1`` or ``/metrics``: 403 ``cross_site``;
* a body that is not ``application/json`` (``multipart/form-data`` too on routes that read their
  own body, the document uploads): 415 ``unsupported_media_type`` -- a cross-site form or
  ``fetch(..., {mode: "no-cors"})`` can only send text/plain, urlencoded or multipart bodies;
* ``GET /metrics`` without a valid key when auth is on: 401.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from memllm_api.auth import authenticate
from memllm_api.config import ApiSettings
from memllm_api.errors import ApiError

STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PROXY_HEADERS = ("x-forwarded-for", "forwarded", "x-real-ip")
DATA_PREFIXES = ("/api/", "/v1/", "/metrics")
DEFAULT_PORTS = {"http": 80, "https": 443}


async def network_guard(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    """Host allow-list, proxy headers without auth, cross-site requests, body content types."""
    if connection.scope["type"] != "http":
        return
    api: ApiSettings = connection.app.state.core.api
    check_host(connection, api)
    check_proxy(connection, api)
    check_cross_site(connection, api)
    check_content_type(connection, handler)


async def metrics_guard(connection: ASGIConnection, _handler: BaseRouteHandler) -> None:
    """With auth on, ``/metrics`` needs a valid key (any tenant's: its labels name no tenant)."""
    if connection.scope["path"] == "/metrics" and connection.app.state.core.api.auth_required:
        await authenticate(connection)  # type: ignore[arg-type]


def host_name(host_header: str) -> str:
    """``"[::1]:8000"`` -> ``"::1"``, ``"Example.COM.:80"`` -> ``"example.com"``."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host[1:]
    return host.rsplit(":", 1)[0].rstrip(".") if host.count(":") == 1 else host.rstrip(".")


def host_allowed(name: str, allowed: tuple[str, ...]) -> bool:
    """``name`` matches an entry: equal, ``*``, or ``*.example.com`` (subdomains of example.com)."""
    for entry in allowed:
        if entry == "*" or entry == name or (entry.startswith("*.") and name.endswith(entry[1:])):
            return True
    return False


def check_host(connection: ASGIConnection, api: ApiSettings) -> None:
    header = connection.headers.get("host", "")
    if not host_allowed(host_name(header), api.host_allow_list):
        raise ApiError(
            400,
            f"host {header!r} is not served here; allow it with MEMLLM_API_ALLOWED_HOSTS",
            "host_not_allowed",
        )


def check_proxy(connection: ASGIConnection, api: ApiSettings) -> None:
    if api.auth_required:
        return
    found = [name for name in PROXY_HEADERS if name in connection.headers]
    if found:
        raise ApiError(
            403,
            f"this request came through a proxy ({found[0]}) but authentication is off: a proxied "
            "deployment must turn it on (MEMLLM_API_AUTH=on, keys from 'memllm keys create')",
            "proxied_without_auth",
        )


def own_origin(connection: ASGIConnection, api: ApiSettings) -> str:
    """``scheme://host[:port]`` of the request itself (behind an authenticated proxy, its scheme)."""
    scheme = connection.scope.get("scheme", "http")
    forwarded_proto = connection.headers.get("x-forwarded-proto", "")
    if api.auth_required and forwarded_proto:
        scheme = forwarded_proto.split(",")[0].strip().lower()
    return normalize_origin(f"{scheme}://{connection.headers.get('host', '')}")


def normalize_origin(origin: str) -> str:
    """Lower case, the default port dropped: ``HTTP://LocalHost:80`` -> ``http://localhost``."""
    try:
        parts = urlsplit(origin.strip().lower())
        port = parts.port
    except ValueError:
        return origin
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != DEFAULT_PORTS.get(parts.scheme):
        host = f"{host}:{port}"
    return f"{parts.scheme}://{host}"


def check_cross_site(connection: ASGIConnection, api: ApiSettings) -> None:
    method = connection.scope.get("method", "GET")
    site = connection.headers.get("sec-fetch-site", "").lower()
    origin = connection.headers.get("origin")
    allowed = api.origin_allow_list
    if origin is not None and ("*" in allowed or normalize_origin(origin) in {normalize_origin(o) for o in allowed}):
        return
    if method in STATE_CHANGING:
        if site == "cross-site":
            raise _cross_site("a cross-site request may not change anything here")
        if origin is not None and normalize_origin(origin) != own_origin(connection, api):
            raise _cross_site(f"origin {origin!r} may not change anything here")
    elif site == "cross-site" and not api.auth_required and connection.scope["path"].startswith(DATA_PREFIXES):
        raise _cross_site("a cross-site page may not read this API's data")


def _cross_site(message: str) -> ApiError:
    return ApiError(403, f"{message} (allow an origin with MEMLLM_API_ALLOWED_ORIGINS)", "cross_site")


def check_content_type(connection: ASGIConnection, handler: BaseRouteHandler) -> None:
    if not has_body(connection):
        return
    ctype = connection.headers.get("content-type", "").split(";")[0].strip().lower()
    reads_own_body = "data" not in handler.parsed_fn_signature.parameters
    accepted = ("application/json", "multipart/form-data") if reads_own_body else ("application/json",)
    if ctype not in accepted:
        raise ApiError(
            415,
            f"unsupported content type {ctype or '(none)'!r}: send the body as {' or '.join(accepted)}",
            "unsupported_media_type",
        )


def has_body(connection: ASGIConnection) -> bool:
    length = connection.headers.get("content-length")
    if length is not None:
        return length.strip() not in ("", "0")
    return "transfer-encoding" in connection.headers

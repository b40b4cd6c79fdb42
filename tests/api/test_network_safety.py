"""What a web page in the user's browser must not do to a local server (api/memllm_api/guards.py).

Real ``memllm serve`` processes: the loopback default (auth off) and one with auth on and its own
host and origin allow-lists. Browser behaviour is simulated with the headers a browser sends
(``Origin``, ``Sec-Fetch-Site``) and a foreign ``Host`` (DNS rebinding).
"""

from __future__ import annotations

import os
import subprocess

import httpx
import pytest
from server_process import ServerProcess, memllm_command, prepare_data_dir

from memllm_api.guards import host_name, normalize_origin

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def c(server):
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def kb_names(c: httpx.Client) -> list[str]:
    r = c.get("/api/kbs")
    assert r.status_code == 200, r.text
    return [kb["name"] for kb in r.json()["data"]]


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    error = r.json()["error"]
    assert error["code"] == code and error["message"] and error["type"], error


# ------------------------------------------------------------------------------ helpers
def test_host_names_and_origins_are_normalized():
    assert host_name("[::1]:8000") == "::1" and host_name("[::1]") == "::1"
    assert host_name("LocalHost:80") == "localhost" and host_name("example.com.") == "example.com"
    assert normalize_origin("HTTP://LocalHost:80") == "http://localhost"
    assert normalize_origin("https://[::1]:8443") == "https://[::1]:8443"


# ------------------------------------------------------------------------------ hosts
def test_a_foreign_host_is_refused(c, server):
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", ""):
        r = c.get("/api/sessions", headers={"host": host})
        assert_error(r, 400, "host_not_allowed")
    assert_error(c.get("/", headers={"host": "rebind.example"}), 400, "host_not_allowed")


def test_loopback_hosts_are_served(c, server):
    port = server.port
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "localhost", "LOCALHOST."):
        assert c.get("/api/kbs", headers={"host": host}).status_code == 200, host


# ------------------------------------------------------------------------------ content types
def test_a_body_that_is_not_json_is_refused_and_creates_nothing(c):
    before = kb_names(c)
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"content-type": ctype} if ctype else {}
        r = c.post("/api/kbs", content=b'{"name": "planted-kb"}', headers=headers)
        assert_error(r, 415, "unsupported_media_type")
        assert "application/json" in r.json()["error"]["message"]
    r = c.post("/v1/chat/completions", content=b'{"messages": [{"role": "user", "content": "hi"}]}')
    assert_error(r, 415, "unsupported_media_type")
    assert kb_names(c) == before
    # the document upload also takes multipart, nothing else
    kb = c.post("/api/kbs", json={"name": "uploads"}).json()
    r = c.post(f"/api/kbs/{kb['id']}/documents", content=b"plain", headers={"content-type": "text/plain"})
    assert_error(r, 415, "unsupported_media_type")
    assert c.get(f"/api/kbs/{kb['id']}/documents").json()["data"] == []
    r = c.post(f"/api/kbs/{kb['id']}/documents", files={"file": ("a.txt", b"A short note about owls.")})
    assert r.status_code == 202, r.text
    r = c.post("/api/kbs", content=b'{"name": "json-kb"}', headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 201, r.text


# ------------------------------------------------------------------------------ cross-site
def test_cross_site_requests_are_refused_and_create_nothing(c, server):
    before = kb_names(c)
    for headers in (
        {"origin": "http://evil.example"},
        {"origin": "null"},
        {"origin": f"http://localhost:{server.port + 1}"},  # another local port is another origin
        {"sec-fetch-site": "cross-site"},
        {"origin": "http://evil.example", "sec-fetch-site": "cross-site"},
    ):
        assert_error(c.post("/api/kbs", json={"name": "planted-kb"}, headers=headers), 403, "cross_site")
    session = c.post("/api/sessions", json={"name": "private"}).json()
    r = c.delete(f"/api/sessions/{session['id']}", headers={"origin": "http://evil.example"})
    assert_error(r, 403, "cross_site")
    assert kb_names(c) == before
    # reading data cross-site (auth off): refused; the session is still there
    r = c.get(f"/api/sessions/{session['id']}/export", headers={"sec-fetch-site": "cross-site"})
    assert_error(r, 403, "cross_site")
    assert c.get(f"/api/sessions/{session['id']}/export").status_code == 200


def test_same_origin_requests_are_served(c, server):
    for origin in (server.url, f"http://localhost:{server.port}"):
        host = origin.removeprefix("http://")
        headers = {"origin": origin, "host": host, "sec-fetch-site": "same-origin"}
        r = c.post("/api/kbs", json={"name": f"same-origin {host}"}, headers=headers)
        assert r.status_code == 201, r.text
    assert c.get("/", headers={"sec-fetch-site": "cross-site"}).status_code == 200  # a link to the page


# ------------------------------------------------------------------------------ proxies
def test_a_proxied_request_without_auth_is_refused(c):
    for header in ("x-forwarded-for", "forwarded", "x-real-ip"):
        r = c.get("/api/kbs", headers={header: "for=203.0.113.7" if header == "forwarded" else "203.0.113.7"})
        assert_error(r, 403, "proxied_without_auth")
        assert "auth" in r.json()["error"]["message"]
    before = kb_names(c)
    r = c.post("/api/kbs", json={"name": "proxied"}, headers={"x-forwarded-for": "203.0.113.7"})
    assert_error(r, 403, "proxied_without_auth")
    assert kb_names(c) == before


# ------------------------------------------------------------------------------ auth on
def create_key(data_dir, tenant: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMLLM_")}
    env["MEMLLM_DATA_DIR"] = str(data_dir)
    out = subprocess.run(
        [*memllm_command(), "keys", "create", "--tenant", tenant], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout.strip()


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """Auth on, a public host name allowed besides loopback, one other origin allowed."""
    data_dir = prepare_data_dir(tmp_path_factory.mktemp("network-safety") / "data")
    key = create_key(data_dir, "acme")
    env = {
        "MEMLLM_API_ALLOWED_HOSTS": "127.0.0.1, api.example, *.corp.example",
        "MEMLLM_API_ALLOWED_ORIGINS": "https://app.example",
        "MEMLLM_API_DEFAULT_MAX_TOKENS": "8",
    }
    with ServerProcess(data_dir, env, args=("--auth", "on", "--no-demo")) as srv:
        yield srv, key


def test_metrics_need_a_key_when_auth_is_on(secured):
    srv, key = secured
    r = httpx.get(srv.url + "/metrics")
    assert_error(r, 401, "missing_key")
    r = httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer mk_not_a_key"})
    assert_error(r, 401, "invalid_key")
    auth = {"Authorization": f"Bearer {key}"}
    kb = httpx.post(srv.url + "/api/kbs", json={"name": "acme-secret-plans"}, headers=auth).json()
    r = httpx.get(srv.url + "/metrics", headers=auth)
    assert r.status_code == 200 and "memllm_http_requests_total" in r.text
    blocks = [line for line in r.text.splitlines() if line.startswith("memllm_memory_blocks{")]
    assert all('kind="' in line and "owner" not in line for line in blocks), blocks
    assert "acme" not in r.text and f"kb-{kb['id']}" not in r.text
    assert httpx.get(srv.url + "/health").status_code == 200  # health still needs no key


def test_the_host_allow_list_replaces_the_default(secured):
    srv, key = secured
    auth = {"Authorization": f"Bearer {key}"}
    for host in ("api.example", "api.example:443", "eu.corp.example", "127.0.0.1"):
        assert httpx.get(srv.url + "/api/kbs", headers={**auth, "host": host}).status_code == 200, host
    for host in ("localhost", "evil.example", "corp.example.evil.example"):
        r = httpx.get(srv.url + "/api/kbs", headers={**auth, "host": host})
        assert_error(r, 400, "host_not_allowed")


def test_allowed_origins_and_proxies_with_auth_on(secured):
    srv, key = secured
    auth = {"Authorization": f"Bearer {key}"}
    headers = {**auth, "origin": "https://app.example", "sec-fetch-site": "cross-site"}
    assert httpx.post(srv.url + "/api/kbs", json={"name": "from-app"}, headers=headers).status_code == 201
    r = httpx.post(srv.url + "/api/kbs", json={"name": "x"}, headers={**auth, "origin": "https://evil.example"})
    assert_error(r, 403, "cross_site")
    # behind a TLS proxy that forwards the scheme, the page's own https origin is same-origin
    proxied = {**auth, "host": "api.example", "origin": "https://api.example", "x-forwarded-proto": "https"}
    proxied["x-forwarded-for"] = "203.0.113.7"
    assert httpx.post(srv.url + "/api/kbs", json={"name": "via-proxy"}, headers=proxied).status_code == 201

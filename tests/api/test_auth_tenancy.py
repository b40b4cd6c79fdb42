"""API keys and tenants against a real server with authentication on, and a restart."""

from __future__ import annotations

import os
import subprocess
import time

import httpx
import openai
import pytest
from server_process import ServerProcess, memllm_command, prepare_data_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RATE_LIMIT = 40  # requests per minute per key
UPLOAD_LIMIT = 100_000  # bytes
TIMEOUT_S = 3  # a generation running longer ends with finish_reason "length"


def create_key(data_dir, tenant: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMLLM_")}
    env["MEMLLM_DATA_DIR"] = str(data_dir)
    out = subprocess.run(
        [*memllm_command(), "keys", "create", "--tenant", tenant], env=env, capture_output=True, text=True, check=True
    )
    key = out.stdout.strip()
    assert key.startswith("mk_") and len(key) > 30, out
    return key


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    data_dir = prepare_data_dir(tmp_path_factory.mktemp("auth") / "data")
    keys = {"alice": create_key(data_dir, "alice"), "bob": create_key(data_dir, "bob")}
    env = {
        "MEMLLM_API_DEFAULT_MAX_TOKENS": "8",
        "MEMLLM_API_RATE_LIMIT_PER_MINUTE": str(RATE_LIMIT),
        "MEMLLM_API_MAX_UPLOAD_BYTES": str(UPLOAD_LIMIT),
        "MEMLLM_API_REQUEST_TIMEOUT_S": str(TIMEOUT_S),
        "MEMLLM_API_MAX_OUTPUT_TOKENS": "2000",
    }
    with ServerProcess(data_dir, env, args=("--auth", "on", "--no-demo")) as srv:
        yield srv, keys


def client_for(url: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_requests_without_a_valid_key_are_refused(secured):
    srv, _keys = secured
    for path in ("/v1/models", "/api/kbs", "/api/sessions"):
        r = httpx.get(srv.url + path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "missing_key"
    r = httpx.get(srv.url + "/api/kbs", headers={"Authorization": "Bearer mk-not-a-real-key"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_key"
    assert httpx.get(srv.url + "/health").status_code == 200  # health needs no key
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_tenants_see_only_their_own_data(secured):
    srv, keys = secured
    alice, bob = client_for(srv.url, keys["alice"]), client_for(srv.url, keys["bob"])
    kb = alice.post("/api/kbs", json={"name": "private"}).json()
    doc = alice.post(f"/api/kbs/{kb['id']}/documents", json={"name": "secret.txt", "text": "The vault code is 4711."})
    assert doc.status_code == 202
    session = alice.post("/api/sessions", json={"name": "diary"}).json()

    # the same names are free for another tenant
    assert bob.post("/api/kbs", json={"name": "private"}).status_code == 201
    assert bob.post("/api/sessions", json={"name": "diary"}).status_code == 201
    assert [k["name"] for k in bob.get("/api/kbs").json()["data"]] == ["private"]
    assert kb["id"] not in [k["id"] for k in bob.get("/api/kbs").json()["data"]]
    assert session["id"] not in [s["id"] for s in bob.get("/api/sessions").json()["data"]]
    # another tenant's ids answer 404, like ids that do not exist, on every route
    for method, path, body in [
        ("GET", f"/api/kbs/{kb['id']}", None),
        ("GET", f"/api/kbs/{kb['id']}/documents", None),
        ("POST", f"/api/kbs/{kb['id']}/search", {"query": "vault code"}),
        ("POST", f"/api/kbs/{kb['id']}/query", {"question": "What is the vault code?"}),
        ("DELETE", f"/api/kbs/{kb['id']}", None),
        ("GET", f"/api/sessions/{session['id']}/messages", None),
        ("POST", f"/api/sessions/{session['id']}/messages", {"content": "hi"}),
        ("DELETE", f"/api/sessions/{session['id']}", None),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "kb_ids": [kb["id"]]}),
        ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "session_id": session["id"]}),
    ]:
        r = bob.request(method, path, json=body)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
    # alice still has everything
    assert alice.get(f"/api/kbs/{kb['id']}").status_code == 200
    assert alice.get(f"/api/sessions/{session['id']}").status_code == 200


def test_revoked_key_stops_working(secured):
    srv, _keys = secured
    key = create_key(srv.data_dir, "carol")
    assert client_for(srv.url, key).get("/api/kbs").status_code == 200
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMLLM_")}
    env["MEMLLM_DATA_DIR"] = str(srv.data_dir)
    listing = subprocess.run(
        [*memllm_command(), "keys", "list", "--tenant", "carol"], env=env, capture_output=True, text=True, check=True
    ).stdout
    key_id = listing.split()[0]
    subprocess.run([*memllm_command(), "keys", "revoke", key_id], env=env, check=True, capture_output=True)
    assert client_for(srv.url, key).get("/api/kbs").status_code == 401


def test_auth_cannot_be_off_beyond_loopback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEMLLM_")}
    env["MEMLLM_DATA_DIR"] = str(tmp_path)
    r = subprocess.run(
        [*memllm_command(), "serve", "--host", "0.0.0.0", "--port", "1", "--auth", "off"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode != 0 and "loopback" in r.stderr


def test_data_and_memory_survive_a_restart(tmp_path):
    data_dir = prepare_data_dir(tmp_path / "data")
    env = {"MEMLLM_API_DEFAULT_MAX_TOKENS": "12", "MEMLLM_LOG_LEVEL": "INFO"}
    fact = "The lighthouse keeper's parrot is called Ptolemy and it speaks Portuguese."
    with ServerProcess(data_dir, env, args=("--no-demo",)) as srv:
        c = httpx.Client(base_url=srv.url, timeout=120)
        kb = c.post("/api/kbs", json={"name": "facts"}).json()
        doc = c.post(f"/api/kbs/{kb['id']}/documents", json={"name": "parrot.txt", "text": fact}).json()
        _wait_ready(c, kb["id"], doc["id"])
        sid = c.post("/api/sessions", json={"name": "restart"}).json()["id"]
        c.post(f"/api/sessions/{sid}/messages", json={"content": "My name is Zorblax. Remember it."})
        before_blocks = c.get(f"/api/kbs/{kb['id']}").json()["memory_blocks"]
        before_history = c.get(f"/api/sessions/{sid}/messages").json()["data"]
    assert (data_dir / "memory" / f"session-{sid}" / "live-state.pt").exists()  # spilled at shutdown
    with ServerProcess(data_dir, env, args=("--no-demo",)) as srv:
        c = httpx.Client(base_url=srv.url, timeout=120)
        assert c.get(f"/api/kbs/{kb['id']}").json()["memory_blocks"] == before_blocks > 0
        assert c.get(f"/api/kbs/{kb['id']}/documents/{doc['id']}").json()["status"] == "ready"
        hits = c.post(f"/api/kbs/{kb['id']}/search", json={"query": "parrot name"}).json()["data"]
        assert hits and "Ptolemy" in hits[0]["text"]
        assert c.get(f"/api/sessions/{sid}/messages").json()["data"] == before_history
        reply = c.post(f"/api/sessions/{sid}/messages", json={"content": "What is my name?"}).json()
        assert "zorblax" in reply["message"]["content"].lower()
        assert f"session {sid}: restored the spilled window" in srv.log(200_000)  # not re-read


def _wait_ready(c: httpx.Client, kb_id: int, doc_id: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = c.get(f"/api/kbs/{kb_id}/documents/{doc_id}").json()["status"]
        if status == "ready":
            return
        assert status != "error"
        time.sleep(0.3)
    raise AssertionError("the document did not become ready")


def test_rate_limit_per_key(secured):
    srv, _keys = secured
    dave, erin = (
        client_for(srv.url, create_key(srv.data_dir, "dave")),
        client_for(srv.url, create_key(srv.data_dir, "erin")),
    )
    statuses = [dave.get("/api/sessions").status_code for _ in range(RATE_LIMIT + 5)]
    assert statuses[:RATE_LIMIT] == [200] * RATE_LIMIT and statuses[-1] == 429
    refused = dave.get("/api/sessions")
    assert refused.json()["error"]["code"] == "rate_limit" and int(refused.headers["retry-after"]) >= 1
    assert erin.get("/api/sessions").status_code == 200  # each key has its own budget


def test_upload_limit(secured):
    srv, keys = secured
    c = client_for(srv.url, keys["bob"])
    kb = c.post("/api/kbs", json={"name": "limits"}).json()
    big = "word " * (UPLOAD_LIMIT // 4)
    for kwargs in ({"json": {"name": "big.txt", "text": big}}, {"files": {"file": ("big.txt", big.encode())}}):
        r = c.post(f"/api/kbs/{kb['id']}/documents", **kwargs)
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large", r.text
    assert c.get(f"/api/kbs/{kb['id']}/documents").json()["data"] == []


def test_a_generation_past_the_time_limit_ends_with_length(secured):
    srv, keys = secured
    c = client_for(srv.url, keys["alice"])
    t0 = time.monotonic()
    body = {"prompt": "Once upon a time", "max_tokens": 2000, "temperature": 0}
    r = c.post("/v1/completions", json=body).json()
    elapsed = time.monotonic() - t0
    assert r["choices"][0]["finish_reason"] == "length"
    assert 0 < r["usage"]["completion_tokens"] < 2000
    assert elapsed < TIMEOUT_S + 10

"""Knowledge bases, documents, query, search and sessions over real HTTP (a real server process)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
from server_process import wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

FACT = (
    "The Zephyr Point lighthouse on the island of Varnholm was painted cobalt blue in 1887 by the engineer "
    "Odile Marchetti. Its lamp flashes green three times every twenty seconds."
)


@pytest.fixture(scope="module")
def c(server):
    with httpx.Client(base_url=server.url, timeout=180) as client:
        yield client


def sse(response: httpx.Response) -> list:
    frames = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[6:]
            frames.append(payload if payload == "[DONE]" else json.loads(payload))
    return frames


def test_document_lifecycle(c):
    kb = c.post("/api/kbs", json={"name": "lighthouses", "description": "test"}).json()
    assert c.post("/api/kbs", json={"name": "lighthouses"}).status_code == 409
    up = c.post(f"/api/kbs/{kb['id']}/documents", files={"file": ("zephyr.txt", FACT.encode(), "text/plain")})
    assert up.status_code == 202, up.text
    doc = wait_ready(c, kb["id"], up.json()["id"])
    assert doc["status"] == "ready" and doc["name"] == "zephyr.txt" and doc["tokens"] > 20
    md = c.post(f"/api/kbs/{kb['id']}/documents", json={"name": "notes.md", "text": "# Notes\nNothing about lamps."})
    wait_ready(c, kb["id"], md.json()["id"])
    listed = c.get(f"/api/kbs/{kb['id']}/documents").json()["data"]
    assert sorted(d["name"] for d in listed) == ["notes.md", "zephyr.txt"]
    full = c.get(f"/api/kbs/{kb['id']}/documents/{doc['id']}", params={"include_text": "true"}).json()
    assert "cobalt blue" in full["text"]

    # re-uploading a name replaces the document; nothing is duplicated
    new_text = FACT.replace("cobalt blue", "scarlet red")
    again = c.put(f"/api/kbs/{kb['id']}/documents/{doc['id']}", json={"name": "ignored", "text": new_text})
    assert again.status_code == 202
    deadline = time.monotonic() + 120
    while "scarlet" not in c.post(f"/api/kbs/{kb['id']}/search", json={"query": "lighthouse colour"}).text:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    listed = c.get(f"/api/kbs/{kb['id']}/documents").json()["data"]
    assert sorted(d["name"] for d in listed) == ["notes.md", "zephyr.txt"]
    hits = c.post(f"/api/kbs/{kb['id']}/search", json={"query": "lighthouse colour", "k": 5}).json()["data"]
    assert not any("cobalt" in h["text"] for h in hits)

    # deleting a document leaves nothing behind in search or memory
    blocks_before = c.get(f"/api/kbs/{kb['id']}").json()["memory_blocks"]
    zephyr = next(d for d in listed if d["name"] == "zephyr.txt")
    assert c.delete(f"/api/kbs/{kb['id']}/documents/{zephyr['id']}").status_code == 204
    assert c.get(f"/api/kbs/{kb['id']}/documents/{zephyr['id']}").status_code == 404
    hits = c.post(f"/api/kbs/{kb['id']}/search", json={"query": "Zephyr lighthouse lamp"}).json()["data"]
    assert all(h["document_name"] != "zephyr.txt" for h in hits)
    assert c.get(f"/api/kbs/{kb['id']}").json()["memory_blocks"] < blocks_before
    assert c.delete(f"/api/kbs/{kb['id']}").status_code == 204
    assert c.get(f"/api/kbs/{kb['id']}").status_code == 404


def test_bad_uploads_change_nothing(c):
    kb = c.post("/api/kbs", json={"name": "strict"}).json()
    cases = [
        ({"files": {"file": ("blob.bin", bytes(range(256)) * 20, "application/octet-stream")}}, 400),
        ({"files": {"file": ("empty.txt", b"   ", "text/plain")}}, 400),
        ({"json": {"name": "x.txt"}}, 400),
        ({"json": {"name": "", "text": "hello"}}, 400),
        ({"content": b"plain words", "headers": {"content-type": "text/plain"}}, 415),
        ({"content": b"{broken", "headers": {"content-type": "application/json"}}, 400),
    ]
    for kwargs, status in cases:
        r = c.post(f"/api/kbs/{kb['id']}/documents", **kwargs)
        assert r.status_code == status, (kwargs, r.text)
        assert r.json()["error"]["message"]
    assert c.get(f"/api/kbs/{kb['id']}/documents").json()["data"] == []
    assert c.post("/api/kbs/999999/documents", json={"name": "a", "text": "b"}).status_code == 404


def test_query_streamed_and_not_with_citations(c):
    kb = c.post("/api/kbs", json={"name": "qa"}).json()
    doc = c.post(f"/api/kbs/{kb['id']}/documents", json={"name": "zephyr.txt", "text": FACT}).json()
    wait_ready(c, kb["id"], doc["id"])
    body = {"question": "What colour is the Zephyr Point lighthouse?", "max_tokens": 12}
    answer = c.post(f"/api/kbs/{kb['id']}/query", json=body).json()
    assert answer["answer"] and answer["usage"]["completion_tokens"] >= 1
    assert answer["sources"][0]["document_name"] == "zephyr.txt" and "cobalt" in answer["sources"][0]["text"]
    assert answer["memory_trace"]
    with c.stream("POST", f"/api/kbs/{kb['id']}/query", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        frames = sse(r)
    assert frames[-1] == "[DONE]"
    done = frames[-2]
    assert done["type"] == "done" and done["answer"] == answer["answer"]
    deltas = [f["text"] for f in frames if isinstance(f, dict) and f["type"] == "delta"]
    assert "".join(deltas).strip() == answer["answer"]
    assert done["sources"] == answer["sources"]


def test_sessions_history_paging_and_export(c):
    s = c.post("/api/sessions", json={"system": "You are terse."}).json()
    assert s["name"].startswith("chat-")
    turns = ["Hello there.", "Tell me a colour.", "Another one."]
    for t in turns[:2]:
        r = c.post(f"/api/sessions/{s['id']}/messages", json={"content": t, "max_tokens": 6})
        assert r.status_code == 200, r.text
        assert r.json()["message"]["content"]
    with c.stream("POST", f"/api/sessions/{s['id']}/messages", json={"content": turns[2], "stream": True}) as r:
        frames = sse(r)
    done = frames[-2]
    assert done["type"] == "done" and done["message"]["content"]
    history = c.get(f"/api/sessions/{s['id']}/messages").json()
    roles = [m["role"] for m in history["data"]]
    assert roles == ["system"] + ["user", "assistant"] * 3 and history["has_more"] is False
    page = c.get(f"/api/sessions/{s['id']}/messages", params={"limit": 2}).json()
    assert [m["ordinal"] for m in page["data"]] == [m["ordinal"] for m in history["data"][-2:]]
    assert page["has_more"] is True
    older = c.get(f"/api/sessions/{s['id']}/messages", params={"limit": 2, "before": page["data"][0]["ordinal"]})
    assert [m["ordinal"] for m in older.json()["data"]] == [m["ordinal"] for m in history["data"][-4:-2]]
    exported = c.get(f"/api/sessions/{s['id']}/export").json()
    assert [m["content"] for m in exported["messages"]] == [m["content"] for m in history["data"]]
    assert c.delete(f"/api/sessions/{s['id']}").status_code == 204
    assert c.get(f"/api/sessions/{s['id']}/messages").status_code == 404


def test_limits_and_bad_input_are_4xx(c):
    checks = [
        c.post("/api/sessions", json={"kb_ids": [424242]}),
        c.post("/api/kbs", json={"name": ""}),
        c.post("/api/kbs", json={"name": "x", "surprise": 1}),
        c.post("/v1/chat/completions", json={"messages": [{"role": "wizard", "content": "hi"}]}),
        c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "temperature": 9}),
        c.post("/v1/completions", json={"prompt": ["a", "b"]}),
        c.post("/v1/embeddings", json={"input": []}),
        c.get("/api/sessions/1/messages", params={"limit": 0}),
        c.get("/api/nothing-here"),
        c.delete("/v1/models"),
    ]
    for r in checks:
        assert 400 <= r.status_code < 500, (r.request.url, r.status_code, r.text)
        assert r.json()["error"]["message"], r.text


def test_metrics_and_schema(c):
    c.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 3})
    text = c.get("/metrics").text
    for name in (
        "memllm_http_requests_total",
        "memllm_http_request_seconds_bucket",
        "memllm_time_to_first_token_seconds_bucket",
        "memllm_generated_tokens_total",
        "memllm_scheduler_queue_depth",
        "memllm_scheduler_batch_size",
        "memllm_scheduler_step_batch_size_bucket",
        "memllm_memory_blocks",
        "memllm_knn_search_seconds_bucket",
    ):
        assert name in text, name
    assert 'route="/v1/completions"' in text
    searches = [ln for ln in text.splitlines() if ln.startswith("memllm_knn_search_seconds_count")]
    assert searches and float(searches[0].split()[-1]) > 0  # the query test above searched memory
    schema = c.get("/schema/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and "/api/kbs/{kb_id}/query" in schema["paths"]
    assert c.get("/schema").status_code == 200
    page = c.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()


def _metric(c: httpx.Client, name: str) -> float:
    for line in c.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in /metrics")


def test_the_model_thread_gets_every_thread_torch_would_use(c):
    """torch's default intra-op threads in a fresh process (MEMLLM_THREADS is not set for this
    server). A regression test: the count was once read after the loader's worker thread had set
    it to 1, and PyTorch starts a new thread at the last count set anywhere."""
    code = "import torch; print(torch.get_num_threads())"
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert _metric(c, "memllm_model_threads") == int(fresh.stdout)


def test_client_disconnect_cancels_the_generation(c, server):
    cancelled = _metric(c, 'memllm_scheduler_jobs{state="cancelled"}')
    body = {"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "stream": True}
    other = httpx.Client(base_url=server.url, timeout=60)
    with other, other.stream("POST", "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(3), strict=False) if line]
        assert got  # the stream started; now the client goes away mid-stream
    deadline = time.monotonic() + 30
    while _metric(c, 'memllm_scheduler_jobs{state="cancelled"}') < cancelled + 1:
        assert time.monotonic() < deadline, "the server kept generating for a client that left"
        time.sleep(0.2)
    assert _metric(c, "memllm_scheduler_active_streams") == 0


def test_posts_that_create_nothing_answer_200(c):
    kb = next(k for k in c.get("/api/kbs").json()["data"] if k["name"] == "demo")
    session = c.post("/api/sessions", json={}).json()
    user = [{"role": "user", "content": "Hi"}]
    for path, body in [
        ("/v1/chat/completions", {"messages": user, "max_tokens": 2}),
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
        ("/v1/embeddings", {"input": "Hi"}),
        (f"/api/kbs/{kb['id']}/search", {"query": "memory"}),
        (f"/api/kbs/{kb['id']}/query", {"question": "What is memllm?", "max_tokens": 2}),
        (f"/api/sessions/{session['id']}/messages", {"content": "Hi", "max_tokens": 2}),
    ]:
        assert c.post(path, json=body).status_code == 200, path

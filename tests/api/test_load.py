"""A bounded load test against a real ``memllm serve`` process and the real bundled model.

16 concurrent clients (asyncio + httpx, one connection pool each) loop for a fixed time over a mix
of OpenAI chat completions (streamed and not, stateless and within a session), native session
turns (streamed and not), document uploads, knowledge-base questions and searches. Then:

- no errors: every response was 2xx, no stream carried an error frame, no client raised;
- nothing lost: every uploaded document ends ``ready`` and is listed (the knowledge base counts
  them all), every session's history holds exactly its user turns, in order, each followed by one
  assistant reply; the server's own request counter saw no 4xx/5xx;
- the search finds uploaded documents by a unique word in each;
- a latency table (p50/p95/p99/max per operation) is printed and written to the test's tmp dir.

MEMLLM_LOAD_SECONDS (default 45) and MEMLLM_LOAD_CLIENTS (default 16) size the run.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import re
import secrets
import time
from collections import defaultdict
from dataclasses import dataclass, field

import httpx
import pytest

from memllm.bench.common import format_table
from memllm.bench.serve import percentile

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

DURATION_S = float(os.environ.get("MEMLLM_LOAD_SECONDS", "45"))
CLIENTS = int(os.environ.get("MEMLLM_LOAD_CLIENTS", "16"))
MAX_TOKENS = 8
READY_TIMEOUT_S = 120.0
OPS = ("chat", "upload", "turn", "search", "chat_stream", "query", "turn_stream", "chat_session")

TOPICS = (
    "tides", "volcanoes", "bread", "the moon", "honeybees", "glaciers", "lighthouses", "chess",
    "coral reefs", "printing", "owls", "rainbows", "compasses", "tea", "whales", "kites",
)  # fmt: skip


@pytest.fixture(scope="module")
def load_server(tmp_path_factory):
    """Its own server: the API tests' small limits, no rate limit (16 clients share one address)."""
    from server_process import ServerProcess  # tests/api/conftest.py puts tests/api on sys.path

    env = {
        "MEMLLM_API_MAX_OUTPUT_TOKENS": "64",
        "MEMLLM_API_DEFAULT_MAX_TOKENS": "16",
        "MEMLLM_API_RATE_LIMIT_PER_MINUTE": "0",
    }
    with ServerProcess(tmp_path_factory.mktemp("load-server") / "data", env, args=("--no-demo",)) as proc:
        yield proc


# ------------------------------------------------------------------------------------ bookkeeping
@dataclass
class Upload:
    kb_id: int
    doc_id: int
    name: str
    word: str


@dataclass
class Record:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    uploads: list[Upload] = field(default_factory=list)
    turns: dict[int, list[str]] = field(default_factory=lambda: defaultdict(list))  # session -> user texts


def unique_word() -> str:
    return "zq" + "".join(random.choice("bcdfghjklmnpqrstvwxz") for _ in range(8))


def document_text(topic: str, word: str) -> str:
    return (
        f"A short field note about {topic}. Observers wrote down what they saw over several seasons, "
        f"comparing their notes with older records kept in the village library. The notes on {topic} "
        f"describe the changes from spring to winter, the people who studied them and the tools they used. "
        f"The catalogue code of this note is {word}, and it is filed under {topic}."
    )


def sse_frames(text: str) -> list[object]:
    """The ``data:`` payloads of an SSE body (JSON objects, or the string ``[DONE]``)."""
    out: list[object] = []
    for line in text.splitlines():
        if line.startswith("data:"):
            payload = line[5:].strip()
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


class Failed(Exception):
    """An operation that got an unexpected answer (recorded as an error)."""


def check_status(op: str, r: httpx.Response, expected: tuple[int, ...] = (200, 201, 202)) -> None:
    if r.status_code not in expected:
        raise Failed(f"{op}: HTTP {r.status_code} {r.request.method} {r.request.url.path}: {r.text[:400]}")


def has_text(frame: object) -> bool:
    """A frame that carries generated text (an OpenAI chunk's delta / text, or a native delta)."""
    if not isinstance(frame, dict):
        return False
    if frame.get("type") == "delta":
        return bool(frame.get("text"))
    return any((c.get("delta") or {}).get("content") or c.get("text") for c in frame.get("choices") or [])


async def stream(client: httpx.AsyncClient, op: str, path: str, body: dict, rec: Record) -> list[object]:
    """POST a streamed request; all its frames. Records the time to the first generated text."""
    t0 = time.monotonic()
    first = None
    frames: list[object] = []
    buffer = ""
    async with client.stream("POST", path, json=body) as r:
        if not 200 <= r.status_code < 300:
            await r.aread()
            check_status(op, r)
        async for piece in r.aiter_text():
            buffer += piece
            *events, buffer = re.split(r"\r?\n\r?\n", buffer)  # events end in a blank line (CRLF or LF)
            new = [f for e in events for f in sse_frames(e)]
            frames += new
            if first is None and any(has_text(f) for f in new):
                first = time.monotonic() - t0
    frames += sse_frames(buffer)
    if first is not None:
        rec.latencies[f"{op} (first text)"].append(first)
    bad = [f for f in frames if isinstance(f, dict) and ("error" in f or f.get("type") == "error")]
    if bad:
        raise Failed(f"{op}: error frame in the stream: {bad[0]}")
    if not frames or frames[-1] != "[DONE]":
        raise Failed(f"{op}: the stream did not end with [DONE] ({len(frames)} frames)")
    return frames


# --------------------------------------------------------------------------------------- one client
async def run_client(i: int, url: str, model: str, kb_id: int, session_id: int, deadline: float, rec: Record):
    rng = random.Random(i)
    own_uploads: list[Upload] = []
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(180.0, connect=30.0)) as client:
        k = 0
        while time.monotonic() < deadline:
            op = OPS[(i + k) % len(OPS)]
            k += 1
            topic = TOPICS[(i + k) % len(TOPICS)]
            t0 = time.monotonic()
            try:
                if op == "chat":
                    body = {
                        "model": model,
                        "messages": [{"role": "user", "content": f"Name one fact about {topic}."}],
                        "max_tokens": MAX_TOKENS,
                        "temperature": 0,
                    }
                    r = await client.post("/v1/chat/completions", json=body)
                    check_status(op, r)
                    out = r.json()
                    if not 1 <= out["usage"]["completion_tokens"] <= MAX_TOKENS:
                        raise Failed(f"{op}: usage {out['usage']}")
                elif op == "chat_stream":
                    body = {
                        "model": model,
                        "messages": [{"role": "user", "content": f"Describe {topic} in a few words."}],
                        "max_tokens": MAX_TOKENS,
                        "temperature": 0,
                        "stream": True,
                        "stream_options": {"include_usage": True},
                    }
                    frames = await stream(client, op, "/v1/chat/completions", body, rec)
                    usage = [f["usage"] for f in frames if isinstance(f, dict) and f.get("usage")]
                    if not usage or not 1 <= usage[-1]["completion_tokens"] <= MAX_TOKENS:
                        raise Failed(f"{op}: no usable usage chunk: {frames[-3:]}")
                elif op in ("turn", "turn_stream", "chat_session"):
                    content = f"Client {i} turn {len(rec.turns[session_id]) + 1}: tell me about {topic}."
                    if op == "chat_session":
                        body = {
                            "model": model,
                            "messages": [{"role": "user", "content": content}],
                            "max_tokens": MAX_TOKENS,
                            "temperature": 0,
                            "session_id": session_id,
                        }
                        r = await client.post("/v1/chat/completions", json=body)
                        check_status(op, r)
                    elif op == "turn":
                        body = {"content": content, "max_tokens": MAX_TOKENS}
                        r = await client.post(f"/api/sessions/{session_id}/messages", json=body)
                        check_status(op, r)
                        if not r.json()["message"]["id"]:
                            raise Failed(f"{op}: no message id: {r.text[:300]}")
                    else:
                        body = {"content": content, "max_tokens": MAX_TOKENS, "stream": True}
                        frames = await stream(client, op, f"/api/sessions/{session_id}/messages", body, rec)
                        done = [f for f in frames if isinstance(f, dict) and f.get("type") == "done"]
                        if len(done) != 1:
                            raise Failed(f"{op}: {len(done)} done events")
                    rec.turns[session_id].append(content)
                elif op == "upload":
                    word = unique_word()
                    name = f"load-c{i}-d{len(own_uploads)}-{secrets.token_hex(3)}.txt"
                    body = {"name": name, "text": document_text(topic, word)}
                    r = await client.post(f"/api/kbs/{kb_id}/documents", json=body)
                    check_status(op, r, (202,))
                    doc = r.json()
                    if doc["name"] != name:
                        raise Failed(f"{op}: answered {doc}")
                    upload = Upload(kb_id, doc["id"], name, word)
                    own_uploads.append(upload)
                    rec.uploads.append(upload)
                elif op == "query":
                    body = {"question": f"What do the notes say about {topic}?", "max_tokens": MAX_TOKENS}
                    r = await client.post(f"/api/kbs/{kb_id}/query", json=body)
                    check_status(op, r)
                    if "answer" not in r.json():
                        raise Failed(f"{op}: {r.text[:300]}")
                elif op == "search":
                    query = own_uploads[-1].word if own_uploads and rng.random() < 0.5 else f"notes about {topic}"
                    r = await client.post(f"/api/kbs/{kb_id}/search", json={"query": query, "k": 5})
                    check_status(op, r)
                    if not isinstance(r.json()["data"], list):
                        raise Failed(f"{op}: {r.text[:300]}")
            except Failed as exc:
                rec.errors.append(str(exc))
                continue
            except Exception as exc:
                rec.errors.append(f"{op}: {type(exc).__name__}: {exc}")
                continue
            rec.latencies[op].append(time.monotonic() - t0)


def latency_table(rec: Record, wall_s: float) -> str:
    rows = []
    for op in sorted(rec.latencies):
        xs = rec.latencies[op]
        rows.append(
            {
                "operation": op,
                "count": len(xs),
                "p50_s": percentile(xs, 0.5),
                "p95_s": percentile(xs, 0.95),
                "p99_s": percentile(xs, 0.99),
                "max_s": max(xs),
            }
        )
    done = sum(len(v) for k, v in rec.latencies.items() if "(" not in k)
    head = (
        f"load test: {CLIENTS} clients for {DURATION_S:.0f} s ({wall_s:.1f} s with the last requests): "
        f"{done} operations, {len(rec.errors)} errors, {len(rec.uploads)} uploads, "
        f"{sum(len(t) for t in rec.turns.values())} session turns"
    )
    return head + "\n" + format_table(rows, digits=3)


def error_statuses(metrics_text: str) -> dict[str, float]:
    """``memllm_http_requests_total`` series whose status is 4xx/5xx (but the 503s of /health
    while the server was loading)."""
    out = {}
    for line in metrics_text.splitlines():
        m = re.match(r"^memllm_http_requests_total\{(.*)\}\s+(\S+)$", line)
        if m and re.search(r'status="[45]\d\d"', m.group(1)) and 'route="/health"' not in m.group(1):
            out[m.group(1)] = float(m.group(2))
    return out


# ----------------------------------------------------------------------------------------- the test
async def wait_ready(client: httpx.AsyncClient, uploads: list[Upload], kb_ids: list[int]) -> dict[int, dict]:
    """Poll until every uploaded document is ready (or errored, or the timeout); the last listing."""
    wanted = {u.doc_id for u in uploads}
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        listed: dict[int, dict] = {}
        for kb_id in kb_ids:
            r = await client.get(f"/api/kbs/{kb_id}/documents")
            r.raise_for_status()
            listed.update({d["id"]: d for d in r.json()["data"]})
        pending = [i for i in wanted if listed.get(i, {}).get("status") not in ("ready", "error")]
        if not pending or time.monotonic() > deadline:
            return listed
        await asyncio.sleep(0.5)


async def run_load(url: str, tmp_path) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as admin:
        model = (await admin.get("/v1/models")).json()["data"][0]["id"]
        kb_ids = []
        seeds = []
        for n in range(2):
            r = await admin.post("/api/kbs", json={"name": f"load-{n}", "description": "load test"})
            check_status("create kb", r)
            kb_ids.append(r.json()["id"])
            doc = {"name": f"seed-{n}.txt", "text": document_text(TOPICS[n], unique_word())}
            r = await admin.post(f"/api/kbs/{kb_ids[-1]}/documents", json=doc)
            check_status("seed upload", r, (202,))
            seeds.append(Upload(kb_ids[-1], r.json()["id"], doc["name"], ""))
        sessions = []
        for i in range(CLIENTS):
            r = await admin.post("/api/sessions", json={"name": f"load-{i}"})
            check_status("create session", r)
            sessions.append(r.json()["id"])
        listed = await wait_ready(admin, seeds, kb_ids)  # queries have something to read
        assert all(listed[s.doc_id]["status"] == "ready" for s in seeds), listed

        rec = Record()
        t0 = time.monotonic()
        deadline = t0 + DURATION_S
        await asyncio.gather(
            *(run_client(i, url, model, kb_ids[i % 2], sessions[i], deadline, rec) for i in range(CLIENTS))
        )
        wall_s = time.monotonic() - t0
        table = latency_table(rec, wall_s)
        print("\n" + table, flush=True)
        (tmp_path / "load-latency.txt").write_text(table + "\n" + "\n".join(rec.errors) + "\n")

        assert not rec.errors, f"{len(rec.errors)} errors under load:\n" + "\n".join(rec.errors[:20])
        for op in OPS:
            assert rec.latencies[op], f"no {op} completed in {DURATION_S} s"

        # every uploaded document ends ready and is listed
        listed = await wait_ready(admin, rec.uploads, kb_ids)
        not_ready = {u.name: listed.get(u.doc_id, {}).get("status", "missing") for u in rec.uploads}
        not_ready = {k: v for k, v in not_ready.items() if v != "ready"}
        assert not not_ready, f"documents not ready {READY_TIMEOUT_S:.0f} s after the run: {not_ready}"
        for u in rec.uploads:
            assert listed[u.doc_id]["name"] == u.name and listed[u.doc_id]["kb_id"] == u.kb_id
        for kb_id in kb_ids:
            expected = 1 + sum(u.kb_id == kb_id for u in rec.uploads)
            info = (await admin.get(f"/api/kbs/{kb_id}")).json()
            assert info["documents"] == expected and info["ready_documents"] == expected, info

        # every session holds exactly its turns, in order, each with one reply
        for sid in sessions:
            r = await admin.get(f"/api/sessions/{sid}/messages", params={"limit": 500})
            check_status("history", r)
            page = r.json()
            sent = rec.turns[sid]
            roles = [m["role"] for m in page["data"]]
            assert not page["has_more"]
            assert len(page["data"]) == 2 * len(sent), (sid, len(sent), roles)
            assert roles == ["user", "assistant"] * len(sent), (sid, roles)
            assert [m["content"] for m in page["data"][0::2]] == sent, sid
            assert (await admin.get(f"/api/sessions/{sid}")).json()["messages"] == 2 * len(sent)

        # the search finds uploaded documents by their unique words
        for u in random.Random(0).sample(rec.uploads, min(6, len(rec.uploads))) + rec.uploads[-1:]:
            r = await admin.post(f"/api/kbs/{u.kb_id}/search", json={"query": u.word, "k": 5})
            check_status("search", r)
            names = [c["document_name"] for c in r.json()["data"]]
            assert u.name in names, (u.word, u.name, names)

        # and the server counted no failed request
        metrics = (await admin.get("/metrics")).text
        assert not error_statuses(metrics), error_statuses(metrics)


def test_sixteen_clients_mixing_chat_upload_and_query(load_server, tmp_path):
    try:
        asyncio.run(run_load(load_server.url, tmp_path))
    except AssertionError:
        print("\nserver log (tail):\n" + load_server.log(6000))
        raise

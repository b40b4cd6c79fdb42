"""Inputs that once answered 500: each must be a clear 4xx in the error shape, with nothing written.

Unicode digits and 5,000-digit numbers (``str.isdigit`` accepts ``"²"``, ``int`` refuses both),
lone surrogates, deeply nested JSON, blank names, oversized text fields, full attention past the
model's trained length. One real server process for the module (tests/api/conftest.py).
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from server_process import wait_ready

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

HUGE_DIGITS = "9" * 5000  # int() refuses more than 4,300 digits
SUPERSCRIPT_TWO = "\u00b2"  # "²": str.isdigit() is True, int() raises
TEXT = "The Zephyr Point lighthouse on Varnholm was painted cobalt blue in 1887. Its lamp flashes green."


@pytest.fixture(scope="module")
def c(server: Any) -> httpx.Client:
    with httpx.Client(base_url=server.url, timeout=180) as client:
        yield client


@pytest.fixture(scope="module")
def kb(c: httpx.Client) -> dict[str, Any]:
    r = c.post("/api/kbs", json={"name": "bad-inputs"})
    assert r.status_code == 201, r.text
    return r.json()


def raw_json(body: Any) -> dict[str, Any]:
    """httpx keyword arguments sending ``body`` as ASCII JSON (lone surrogates as ``\\ud800`` escapes,
    which httpx's own ``json=`` cannot encode)."""
    return {"content": json.dumps(body).encode(), "headers": {"content-type": "application/json"}}


def assert_refused(r: httpx.Response, *statuses: int, param: str | None = None, says: str | None = None) -> dict:
    """A 4xx (one of ``statuses`` if given) in the OpenAI error shape; returns the error object."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    if statuses:
        assert r.status_code in statuses, (r.status_code, r.text[:500])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}, error
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param or param in error["message"], error
    if says is not None:
        assert says in error["message"], error
    return error


def counts(c: httpx.Client) -> tuple[int, int]:
    """(knowledge bases, sessions) of the caller."""
    return len(c.get("/api/kbs").json()["data"]), len(c.get("/api/sessions").json()["data"])


def documents(c: httpx.Client, kb_id: int) -> list[dict[str, Any]]:
    return c.get(f"/api/kbs/{kb_id}/documents").json()["data"]


# ------------------------------------------------------------------------------ 1. logit_bias keys
@pytest.mark.parametrize("key", [SUPERSCRIPT_TWO, HUGE_DIGITS, "١٢", " 12 3", "-5", ""])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_logit_bias_keys_that_are_not_token_ids(c: httpx.Client, path: str, key: str) -> None:
    body: dict[str, Any] = {"max_tokens": 2, "logit_bias": {key: 5}}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    assert_refused(c.post(path, json=body), 400, param="logit_bias")


# ------------------------------------------------------------------------------ 2. session ids
@pytest.mark.parametrize("ref", [SUPERSCRIPT_TWO, HUGE_DIGITS, "99999999999999999999", "-1"])
def test_session_id_that_names_nothing(c: httpx.Client, ref: str) -> None:
    before = counts(c)
    body = {"session_id": ref, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert_refused(c.post("/v1/chat/completions", json=body), 400, 404, param="session_id")
    assert counts(c) == before


@pytest.mark.parametrize("ref", [SUPERSCRIPT_TWO, HUGE_DIGITS, "99999999999999999999", "0", "-3", "1e3"])
def test_native_paths_with_odd_ids(c: httpx.Client, kb: dict[str, Any], ref: str) -> None:
    before = counts(c)
    for method, path in [
        ("GET", f"/api/sessions/{ref}"),
        ("GET", f"/api/sessions/{ref}/messages"),
        ("DELETE", f"/api/sessions/{ref}"),
        ("GET", f"/api/kbs/{ref}"),
        ("GET", f"/api/kbs/{kb['id']}/documents/{ref}"),
        ("DELETE", f"/api/kbs/{ref}"),
    ]:
        assert_refused(c.request(method, path), 400, 404)
    s = c.post("/api/sessions", json={}).json()
    for before_param in (HUGE_DIGITS, SUPERSCRIPT_TWO, "-1"):
        r = c.get(f"/api/sessions/{s['id']}/messages", params={"before": before_param})
        assert_refused(r, 400)
    assert c.delete(f"/api/sessions/{s['id']}").status_code == 204
    assert counts(c) == before


# ------------------------------------------------------------------------------ 3. lone surrogates
@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"name": "lone.txt", "text": "before \ud800 after"}, "text"),
        ({"name": "lone-\udfff.txt", "text": TEXT}, "name"),
        ({"name": "lone-meta.txt", "text": TEXT, "meta": {"k": "\ud800"}}, "meta"),
    ],
)
def test_document_with_a_lone_surrogate(c: httpx.Client, kb: dict[str, Any], body: dict, param: str) -> None:
    docs = documents(c, kb["id"])
    r = c.post(f"/api/kbs/{kb['id']}/documents", **raw_json(body))
    assert_refused(r, 400, param=param)
    assert documents(c, kb["id"]) == docs


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/kbs", {"name": "x\ud800"}),
        ("/api/sessions", {"name": "x\ud800"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}], "max_tokens": 2}),
        ("/v1/completions", {"prompt": "a\udc00", "max_tokens": 2}),
    ],
)
def test_lone_surrogates_in_other_bodies(c: httpx.Client, path: str, body: dict) -> None:
    before = counts(c)
    assert_refused(c.post(path, **raw_json(body)), 400)
    assert counts(c) == before


# ------------------------------------------------------------------------------ 4. nested meta
def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


@pytest.mark.parametrize("depth", [10_000, 17])
def test_deeply_nested_meta(c: httpx.Client, kb: dict[str, Any], depth: int) -> None:
    docs = documents(c, kb["id"])
    raw = '{"name": "deep.txt", "text": ' + json.dumps(TEXT) + ', "meta": ' + nested(depth) + "}"
    r = c.post(f"/api/kbs/{kb['id']}/documents", content=raw.encode(), headers={"content-type": "application/json"})
    assert_refused(r, 400, param="meta")
    assert documents(c, kb["id"]) == docs


def test_large_meta(c: httpx.Client, kb: dict[str, Any]) -> None:
    docs = documents(c, kb["id"])
    body = {"name": "big-meta.txt", "text": TEXT, "meta": {"blob": "x" * 20_000}}
    assert_refused(c.post(f"/api/kbs/{kb['id']}/documents", json=body), 400, param="meta")
    assert documents(c, kb["id"]) == docs


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/chat/completions", "tools"),
        ("/v1/chat/completions", "response_format"),
        ("/v1/completions", "unknown_extra"),
    ],
)
def test_deeply_nested_request_bodies(c: httpx.Client, path: str, field: str) -> None:
    deep = nested(10_000)
    head = '"messages": [{"role": "user", "content": "hi"}]' if "chat" in path else '"prompt": "hi"'
    value = {
        "tools": '[{"type": "function", "function": {"name": "f", "parameters": ' + deep + "}}]",
        "response_format": '{"type": "json_schema", "json_schema": {"name": "r", "schema": ' + deep + "}}",
        "unknown_extra": deep,
    }[field]
    raw = "{" + head + ', "max_tokens": 2, "' + field + '": ' + value + "}"
    assert_refused(c.post(path, content=raw.encode(), headers={"content-type": "application/json"}), 400)


# ------------------------------------------------------------------------------ 5. re-upload by name
@pytest.mark.parametrize("name", [SUPERSCRIPT_TWO, "7", "notes.txt"])
def test_reupload_by_name_answers_202(c: httpx.Client, kb: dict[str, Any], name: str) -> None:
    url = f"/api/kbs/{kb['id']}/documents"
    first = c.post(url, json={"name": name, "text": TEXT})
    assert first.status_code == 202, first.text
    assert wait_ready(c, kb["id"], first.json()["id"])["status"] == "ready"
    same = c.post(url, json={"name": name, "text": TEXT})  # same content: skipped
    assert same.status_code == 202, same.text
    assert same.json()["id"] == first.json()["id"] and same.json()["name"] == name
    changed = c.post(url, json={"name": name, "text": TEXT.replace("cobalt blue", "scarlet red")})
    assert changed.status_code == 202, changed.text
    assert changed.json()["name"] == name
    assert [d["name"] for d in documents(c, kb["id"])].count(name) == 1


# ------------------------------------------------------------------------------ 6. blank names
@pytest.mark.parametrize("name", ["   ", "", "\t\n"])
def test_blank_names_are_400(c: httpx.Client, name: str) -> None:
    before = counts(c)
    assert_refused(c.post("/api/kbs", json={"name": name}), 400, param="name")
    assert_refused(c.post("/api/sessions", json={"name": name}), 400, param="name")
    assert counts(c) == before


def test_names_are_stripped(c: httpx.Client) -> None:
    kb = c.post("/api/kbs", json={"name": "  padded  "})
    assert kb.status_code == 201 and kb.json()["name"] == "padded"
    assert_refused(c.post("/api/kbs", json={"name": "padded"}), 409)
    s = c.post("/api/sessions", json={"name": "  padded  "})
    assert s.status_code == 201 and s.json()["name"] == "padded"
    assert c.delete(f"/api/kbs/{kb.json()['id']}").status_code == 204
    assert c.delete(f"/api/sessions/{s.json()['id']}").status_code == 204


# ------------------------------------------------------------------------------ 7. length limits
BIG = "word " * 220_000  # 1.1 MB of text


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/api/kbs/{kb}/search", {"query": "x" * 4001}, "query"),
        ("/api/kbs/{kb}/search", {"query": BIG}, "query"),
        ("/api/kbs/{kb}/query", {"question": "x" * 8001}, "question"),
        ("/api/kbs", {"name": "n" * 201}, "name"),
        ("/api/kbs", {"name": "n", "description": "d" * 2001}, "description"),
        ("/api/sessions", {"name": "n" * 201}, "name"),
        ("/api/sessions", {"system": "s" * 20_001}, "system"),
        ("/api/sessions/{session}/messages", {"content": BIG}, "content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": BIG}]}, "content"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": BIG}]}]}, "text"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "word " * 110_000}] * 2},
            "messages",
        ),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["s" * 1001]}, "stop"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "user": "u" * 1001}, "user"),
        ("/v1/completions", {"prompt": BIG}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "stop": "s" * 1001}, "stop"),
        ("/v1/embeddings", {"input": "x" * 40_000}, "input"),
    ],
)
def test_oversized_text_fields(c: httpx.Client, kb: dict[str, Any], path: str, body: dict, param: str) -> None:
    before = counts(c)
    session = c.post("/api/sessions", json={}).json()
    url = path.format(kb=kb["id"], session=session["id"])
    t0 = time.monotonic()
    r = c.post(url, json=body)
    assert time.monotonic() - t0 < 1.0, "an oversized field must be refused before any work"
    error = assert_refused(r, 400)
    assert param in error["message"] or error["param"] == param, error
    assert c.get(f"/api/sessions/{session['id']}").json()["messages"] <= 1  # the system message at most
    assert c.delete(f"/api/sessions/{session['id']}").status_code == 204
    assert counts(c) == before


# ------------------------------------------------------------------------------ full attention
def test_full_attention_past_the_trained_length(c: httpx.Client) -> None:
    long_prompt = "hello " * 9000  # past smollm2-135m's 8192 positions
    body = {"prompt": long_prompt, "max_tokens": 2, "memory": {"mode": "full"}}
    assert_refused(c.post("/v1/completions", json=body), 400, param="memory", says="full")
    chat = {"messages": [{"role": "user", "content": long_prompt}], "max_tokens": 2, "memory": {"mode": "full"}}
    assert_refused(c.post("/v1/chat/completions", json=chat), 400, param="memory", says="full")
    ok = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 2, "memory": {"mode": "full"}})
    assert ok.status_code == 200, ok.text

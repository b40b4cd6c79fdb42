"""A server killed while it reads a document: after a restart the document says so, and the web page
offers a retry that reads it again from its kept text.

A real ``memllm serve`` (the bundled model) is SIGKILLed while the document is ``encoding``; a second
server on the same data directory finds it, marks it ``error`` (interrupted, retryable); headless
Chromium shows the error and the Retry button, whose click brings the document to ``ready``.
"""

from __future__ import annotations

import time

import httpx
import pytest
from test_web_page import browser_page, chromium  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NAME = "long-ledger.txt"
SENTENCE = "The keeper of Varnholm wrote the name of ship number {i} in green ink and its cargo in black. "
TEXT = "".join(SENTENCE.format(i=i) for i in range(600))  # ~14K tokens: seconds of reading on two cores


def _wait_status(client: httpx.Client, kb_id: int, wanted: set[str], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    doc: dict = {}
    while time.monotonic() < deadline:
        docs = client.get(f"/api/kbs/{kb_id}/documents").json()["data"]
        doc = next((d for d in docs if d["name"] == NAME), {})
        if doc.get("status") in wanted:
            return doc
        time.sleep(0.1)
    pytest.fail(f"document status {doc.get('status')!r} after {timeout_s:.0f} s, wanted {sorted(wanted)}")


def test_killed_ingestion_is_reported_and_retried_from_the_page(chromium, browser_page, tmp_path):  # noqa: F811
    from playwright.sync_api import expect
    from server_process import ServerProcess

    data_dir = tmp_path / "data"
    first = ServerProcess(data_dir, env={"MEMLLM_THREADS": "1"})
    first.start()
    try:
        with httpx.Client(base_url=first.url, timeout=60) as client:
            kb = client.post("/api/kbs/", json={"name": "ledgers"})
            assert kb.status_code == 201, kb.text
            kb_id = kb.json()["id"]
            r = client.post(f"/api/kbs/{kb_id}/documents", json={"name": NAME, "text": TEXT})
            assert r.status_code == 202, r.text
            doc = _wait_status(client, kb_id, {"encoding"}, 120)
    finally:
        assert first.proc is not None
        first.proc.kill()  # SIGKILL mid-encoding: no handler runs
        first.proc.wait(timeout=30)
        first.proc = None

    second = ServerProcess(data_dir)
    second.start()
    try:
        with httpx.Client(base_url=second.url, timeout=60) as client:
            after = client.get(f"/api/kbs/{kb_id}/documents/{doc['id']}").json()
            assert after["status"] == "error" and after["retryable"] is True, after
            assert after["error"].startswith("interrupted") and "retry it" in after["error"]
        page = browser_page
        page.goto(f"{second.url}/#kb/{kb_id}")
        item = page.get_by_test_id("doc-item").filter(has_text=NAME)
        expect(item.get_by_test_id("doc-status")).to_have_text("error")
        expect(item.get_by_test_id("doc-error")).to_contain_text("interrupted")
        item.get_by_test_id("doc-retry").click()
        expect(item.get_by_test_id("doc-status")).to_have_text("ready", timeout=300_000)
        expect(item.get_by_test_id("doc-retry")).to_have_count(0)
        assert not page.problems, page.problems  # type: ignore[attr-defined]

        with httpx.Client(base_url=second.url, timeout=60) as client:
            final = client.get(f"/api/kbs/{kb_id}/documents/{doc['id']}?include_text=true").json()
            assert final["status"] == "ready" and final["retryable"] is False
            assert final["text"].strip() == TEXT.strip()
            again = client.post(f"/api/kbs/{kb_id}/documents/{doc['id']}/retry")
            assert again.status_code == 409 and again.json()["error"]["code"] == "not_retryable"
    finally:
        second.stop()

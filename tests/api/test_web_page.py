"""The web page in headless Chromium against a real ``memllm serve`` process and the real bundled model.

The page is driven the way a person uses it: create a chat session, send a message and watch the reply
stream in, create a knowledge base, upload a document, wait for it to be ready, ask about it and open
a citation. Debian's Chromium (/usr/bin/chromium, installed by .ci/browser.sh) is driven through Python
playwright; no browser is ever downloaded. A missing Chromium is a failure, not a skip.

MEMLLM_TEST_SERVER_URL=http://host:port runs the page against a server that is already running
instead of starting one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CHROMIUM = Path(os.environ.get("MEMLLM_CHROMIUM", "/usr/bin/chromium"))
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
MAX_TOKENS = "24"  # keeps generation short on two CPU cores

DOCUMENT_NAME = "zephyr-lighthouse.txt"
DOCUMENT = """\
The Zephyr Point lighthouse stands on the northern cape of the fictional island of Varnholm.
It was built in 1887 by the engineer Odile Marchetti, who painted the tower a deep cobalt blue so
that fishermen could tell it apart from the white lighthouses on the mainland.

The lamp of the Zephyr Point lighthouse flashes green three times every twenty seconds. Its light
can be seen from forty-two kilometres away on a clear night.

Since 1962 the lighthouse keeper's cottage has been a small museum about the storms of Varnholm.
The museum's most famous object is a brass bell recovered from the wreck of the schooner Halcyon.
"""
QUESTION = "What color is the Zephyr Point lighthouse painted?"


# ---------- the server ----------


@pytest.fixture(scope="module")
def chromium() -> Path:
    """Checked before the server starts: a missing browser fails at once, with the fix."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}: run `bash .ci/browser.sh` "
            "(apt-get install chromium) before the web-page test"
        )
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.fail("the Python package playwright is missing: pip install -e '.[dev]'")
    return CHROMIUM


@pytest.fixture(scope="module")
def server_url(chromium, tmp_path_factory):
    external = os.environ.get("MEMLLM_TEST_SERVER_URL")
    if external:
        yield external.rstrip("/")
        return
    from server_process import ServerProcess  # tests/api/conftest.py puts tests/api on sys.path

    server = ServerProcess(tmp_path_factory.mktemp("web-server") / "data")
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(f"`memllm serve` did not start: {exc}")
    try:
        yield server.url
    finally:
        server.stop()


# ---------- the browser ----------


@pytest.fixture
def browser_page(chromium, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            user_data_dir=str(tmp_path / "chromium-profile"),
            executable_path=str(chromium),
            headless=True,
            args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        context.set_default_timeout(30_000)
        page = context.pages[0] if context.pages else context.new_page()
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on(
            "console", lambda msg: problems.append(f"console {msg.type}: {msg.text}") if msg.type == "error" else None
        )
        page.problems = problems  # type: ignore[attr-defined]
        try:
            yield page
        finally:
            context.close()


def _wait_state(page, selector: str, wanted: str, timeout_s: float, what: str) -> None:
    """Wait until the element's data-state (or data-status) is ``wanted``; fail fast on an error state."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        el = page.locator(selector).first
        if el.count():
            last = el.get_attribute("data-state") or el.get_attribute("data-status")
            if last == wanted:
                return
            if last == "error":
                shown = page.locator("[data-testid=error]").all_inner_texts()
                detail = el.inner_text()
                pytest.fail(f"{what}: the page shows an error: {detail!r}; messages: {shown}")
        time.sleep(0.2)
    pytest.fail(f"{what}: still {last!r} after {timeout_s:.0f} s (wanted {wanted!r})")


# ---------- the test ----------


def test_web_page_chat_upload_and_citation(server_url, browser_page, tmp_path):
    from playwright.sync_api import expect

    page = browser_page
    doc_path = tmp_path / DOCUMENT_NAME
    doc_path.write_text(DOCUMENT)
    stream_types: list[str] = []
    page.on(
        "response",
        lambda r: (
            stream_types.append(r.headers.get("content-type", ""))
            if r.request.method == "POST" and r.url.endswith(("/messages", "/query"))
            else None
        ),
    )

    try:
        page.goto(server_url + "/")
        expect(page).to_have_title("memllm")
        expect(page.get_by_test_id("health")).to_have_text("ready")

        # Short, greedy generation.
        page.get_by_test_id("settings-toggle").click()
        page.get_by_label("Max tokens").fill(MAX_TOKENS)
        page.get_by_label("Temperature").fill("0")
        page.get_by_test_id("settings-toggle").click()

        # --- a chat session with a streamed reply ---
        page.get_by_label("New session name").fill("Browser test")
        page.get_by_test_id("create-session").click()
        expect(page.get_by_test_id("chat-pane")).to_be_visible()
        expect(page.get_by_test_id("chat-title")).to_have_text("Browser test")
        expect(page.get_by_test_id("session-item")).to_have_count(1)

        # Record every change of the streamed reply's text, with the bubble's state at that moment.
        page.evaluate(
            """() => {
                window.__seen = [];
                const box = document.querySelector('[data-testid=messages]');
                new MutationObserver(() => {
                    const all = box.querySelectorAll('[data-testid=message-assistant]');
                    const b = all[all.length - 1];
                    if (!b) return;
                    const t = b.querySelector('[data-testid=message-content]').textContent;
                    const last = window.__seen[window.__seen.length - 1];
                    if (!last || last.len !== t.length || last.state !== b.dataset.state)
                        window.__seen.push({len: t.length, state: b.dataset.state});
                }).observe(box, {subtree: true, childList: true, characterData: true, attributes: true});
            }"""
        )
        page.get_by_label("Message").fill("Say hello to me in one short sentence.")
        page.get_by_test_id("chat-send").click()
        expect(page.get_by_test_id("message-user").get_by_test_id("message-content")).to_have_text(
            "Say hello to me in one short sentence."
        )
        expect(page.get_by_test_id("chat-stop")).to_be_visible()
        _wait_state(page, "[data-testid=message-assistant]", "done", 120, "the chat reply")
        reply = page.get_by_test_id("message-assistant").get_by_test_id("message-content").inner_text()
        assert reply.strip() and reply != "(empty answer)", "the streamed reply is empty"
        seen = page.evaluate("window.__seen")
        streamed = [s for s in seen if s["state"] == "streaming" and s["len"] > 0]
        assert streamed, f"no text appeared before the reply was complete (not streamed): {seen}"
        assert any(t.startswith("text/event-stream") for t in stream_types), stream_types
        expect(page.get_by_test_id("chat-stop")).to_be_hidden()

        # The history comes back from the server after a reload (the URL keeps the session).
        page.reload()
        expect(page.get_by_test_id("chat-pane")).to_be_visible()
        expect(page.get_by_test_id("message-user")).to_have_count(1)
        expect(page.get_by_test_id("message-assistant")).to_have_count(1)
        expect(page.get_by_test_id("message-assistant").get_by_test_id("message-content")).not_to_be_empty()

        # --- a knowledge base, a document upload, a cited answer ---
        page.get_by_label("New knowledge base name").fill("Lighthouses")
        page.get_by_test_id("create-kb").click()
        expect(page.get_by_test_id("kb-pane")).to_be_visible()
        expect(page.get_by_test_id("kb-title")).to_have_text("Lighthouses")

        page.get_by_label("Upload a file").set_input_files(str(doc_path))
        page.get_by_test_id("upload-submit").click()
        doc = page.get_by_test_id("doc-item").filter(has_text=DOCUMENT_NAME)
        expect(doc).to_have_count(1)
        _wait_state(page, "[data-testid=doc-item] [data-testid=doc-status]", "ready", 180, "the uploaded document")
        expect(doc.get_by_test_id("doc-status")).to_have_text("ready")
        expect(page.get_by_test_id("kb-meta")).to_contain_text("1 of 1 document ready")

        page.get_by_label("Question").fill(QUESTION)
        page.get_by_test_id("ask-send").click()
        answer = page.get_by_test_id("answer").first
        expect(answer.get_by_test_id("answer-question")).to_contain_text(QUESTION)
        _wait_state(page, "[data-testid=answer]", "done", 120, "the knowledge-base answer")
        assert answer.get_by_test_id("answer-text").inner_text().strip(), "the answer is empty"

        citations = answer.get_by_test_id("citation")
        assert citations.count() >= 1, "the answer shows no citation"
        first = citations.first
        passage = first.get_by_test_id("citation-text")
        expect(passage).to_be_hidden()  # collapsed until clicked
        expect(first.get_by_test_id("citation-name")).to_contain_text(DOCUMENT_NAME)
        first.get_by_test_id("citation-toggle").click()
        expect(passage).to_be_visible()
        text = passage.inner_text()
        assert "Zephyr" in text or "lighthouse" in text or "Varnholm" in text, f"unexpected cited passage: {text!r}"

        # --- a narrow window: the sidebar is a drawer behind the menu button ---
        page.set_viewport_size({"width": 390, "height": 800})
        menu = page.get_by_test_id("menu-toggle")
        expect(menu).to_be_visible()
        menu.click()
        expect(menu).to_have_attribute("aria-expanded", "true")
        page.get_by_test_id("session-select").first.click()
        expect(page.get_by_test_id("chat-pane")).to_be_visible()
        expect(menu).to_have_attribute("aria-expanded", "false")

        expect(page.get_by_test_id("error")).to_have_count(0)
        assert not page.problems, page.problems  # type: ignore[attr-defined]
    except BaseException:
        shot = tmp_path / "web-page-failure.png"
        try:
            page.screenshot(path=str(shot), full_page=True)
            print(f"screenshot of the page at the failure: {shot}")
        except Exception as exc:  # the browser may be gone
            print(f"no screenshot: {exc}")
        print("browser problems:", getattr(page, "problems", []))
        raise

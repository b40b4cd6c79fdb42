"""The chat and knowledge services through a scheduler: concurrent requests batch, the event loop
never runs the model, and every answer is the one the service gives without a scheduler."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from pathlib import Path

import pytest

from memllm.sampling import SamplingParams
from memllm.serving import Scheduler

TESTS = Path(__file__).resolve().parents[1]
for sub in ("chat", "knowledge"):
    sys.path.insert(0, str(TESTS / sub))

from chat_helpers import SMALL_MEMORY, make_service, migrated_store, tiny_chat_model  # noqa: E402
from kb_helpers import PARAGRAPHS, service_at  # noqa: E402
from kb_helpers import tiny_engine as kb_tiny_engine  # noqa: E402


@contextlib.contextmanager
def model_threads(model):
    """The names of the threads that ran ``model``'s forward."""
    names: set[str] = set()
    hook = model.register_forward_pre_hook(lambda *_: names.add(threading.current_thread().name))
    try:
        yield names
    finally:
        hook.remove()


@contextlib.asynccontextmanager
async def maybe_scheduler(engine, on: bool, sizes: list[int]):
    if not on:
        yield None
        return
    sched = Scheduler(engine, max_batch=8, on_step=lambda n, _s: sizes.append(n))
    try:
        yield sched
    finally:
        await sched.close()


@pytest.fixture(scope="module")
def tiny_chat():
    return tiny_chat_model()


QUESTIONS = ["hello there", "what do you remember?", "tell me a long story about the sea"]


async def _chat_rounds(tiny_chat, root: Path, scheduled: bool) -> tuple[list, list[int]]:
    params = SamplingParams(max_tokens=12)
    sizes: list[int] = []
    store = await migrated_store(f"sqlite+aiosqlite:///{root / 'db.sqlite'}", root / "data")
    try:
        svc = make_service(tiny_chat, store, SMALL_MEMORY)
        async with maybe_scheduler(svc.engine, scheduled, sizes) as sched:
            svc.scheduler = sched
            sessions = [(await svc.create(f"s{i}")).id for i in range(len(QUESTIONS))]
            await svc.append_messages(sessions[0], [{"role": "user", "content": "remember the number 42"}] * 3)
            out = []
            for round_ in range(3):
                if round_ == 2:
                    svc.drop_live()  # the next turns rebuild their windows from the database
                turns = [svc.reply(sid, q, params) for sid, q in zip(sessions, QUESTIONS, strict=True)]
                if scheduled:
                    results = await asyncio.gather(*turns)
                else:
                    results = [await t for t in turns]
                out.append([(r.text, r.completion_tokens, r.finish_reason, r.committed) for r in results])
        return out, sizes
    finally:
        await store.close()


async def test_chat_turns_batch_and_answer_as_without_a_scheduler(tiny_chat, tmp_path):
    want, _ = await _chat_rounds(tiny_chat, tmp_path / "plain", scheduled=False)
    with model_threads(tiny_chat.model) as threads:
        got, sizes = await _chat_rounds(tiny_chat, tmp_path / "scheduled", scheduled=True)
    assert got == want
    assert max(sizes) == len(QUESTIONS)  # the three sessions decoded in one batch
    assert threads == {"memllm-model"}  # never on the event loop


async def test_a_chat_turn_left_early_is_cancelled_and_not_recorded(tiny_chat, tmp_path):
    store = await migrated_store(f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}", tmp_path / "data")
    sched = Scheduler(make_service(tiny_chat, store).engine)
    try:
        svc = make_service(tiny_chat, store, SMALL_MEMORY, scheduler=sched)
        sid = (await svc.create("s")).id
        stream = svc.turn(sid, "talk for a long time", SamplingParams(max_tokens=500)).stream()
        async for _ in stream:
            break
        await stream.aclose()  # the client went away
        stats = sched.stats()
        assert stats.cancelled == 1 and stats.running == 0
        assert (await svc.get(sid)).message_count == 0
        r = await svc.reply(sid, "hi", SamplingParams(max_tokens=4))  # the session still works
        assert r.committed and (await svc.get(sid)).message_count == 2
    finally:
        await sched.close()
        await store.close()


def hold_until_queued(sched: Scheduler, n: int, timeout: float = 120.0) -> None:
    """A scheduler task: keeps the model thread until ``n`` jobs wait in the queue, so that they are
    admitted together (otherwise their submissions race with the service's own work before them)."""
    deadline = time.monotonic() + timeout
    while sched.stats().queued < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} jobs were not queued within {timeout} s")
        time.sleep(0.002)


async def _kb_answers(engine, root: Path, scheduled: bool) -> tuple[list, list[int]]:
    sizes: list[int] = []
    async with maybe_scheduler(engine, scheduled, sizes) as sched, service_at(root, engine, scheduler=sched) as svc:
        await svc.create_kb("kb")
        await svc.ingest_texts("kb", [(f"p{i}.txt", p, {}) for i, p in enumerate(PARAGRAPHS)])
        questions = [("Who kept a ledger?", "memory"), ("When did the harbour freeze?", "hybrid"), ("Bread?", "rag")]
        asks = [svc.ask("kb", q, mode=m, max_tokens=8, restrict="none") for q, m in questions]
        if scheduled:
            gate = asyncio.ensure_future(sched.run(hold_until_queued, sched, len(asks)))
            await asyncio.sleep(0)  # the gate is posted before any job
            answers = await asyncio.gather(*asks)
            await gate
        else:
            answers = [await a for a in asks]
        out = [(a.text, a.completion_tokens, a.finish_reason, [c.chunk_id for c in a.citations]) for a in answers]
        summary = await svc.summarize("kb", "p0.txt", max_tokens=6)
        return [*out, summary.text], sizes


async def test_knowledge_answers_batch_and_match_without_a_scheduler(tmp_path):
    engine = kb_tiny_engine()
    want, _ = await _kb_answers(engine, tmp_path / "plain", scheduled=False)
    with model_threads(engine.model) as threads:
        got, sizes = await _kb_answers(engine, tmp_path / "scheduled", scheduled=True)
    assert got == want
    assert max(sizes) == 3  # the three answers decoded in one batch
    assert threads == {"memllm-model"}

"""Turns beside failed turns, beside another process, over empty knowledge bases, and cut by the
API's time limit: every recorded stream still tiles (messages and blocks, once each)."""

from __future__ import annotations

import asyncio
import itertools
from types import SimpleNamespace

import pytest
from chat_helpers import SMALL_MEMORY, make_service, migrated_store
from test_chat_sessions import _check_stream, _rows

from memllm.chat.service import SessionConflictError
from memllm.sampling import SamplingParams
from memllm_storage.owners import Owner
from memllm_storage.repositories import KnowledgeBaseRepository

PARAMS = SamplingParams(max_tokens=10)
LONG = "A fairly long message that pushes blocks out of the window. " * 3


async def _check_session(service, store, session_id):
    info = await service.get(session_id)
    msgs, blocks = await _rows(store, session_id)
    _check_stream(msgs, blocks, info.token_count)
    return msgs


async def test_a_turn_waiting_on_a_failed_turn_reloads_the_state(service, store):
    info = await service.create("waiter", system="Be brief.")
    await service.reply(info.id, LONG, PARAMS)
    failing = service.turn(info.id, LONG, SamplingParams(max_tokens=30)).stream()
    await anext(failing)  # holds the session: its prompt is read into the live state
    waiting = asyncio.ensure_future(service.reply(info.id, "And the waiting turn. " + LONG, PARAMS))
    await asyncio.sleep(0)  # the waiting turn is on the lock now
    await failing.aclose()  # the reader went away: not recorded, live state dropped
    result = await waiting
    assert result.assistant_message_id is not None
    msgs = await _check_session(service, store, info.id)
    assert [m.role for m in msgs] == ["system", "user", "assistant", "user", "assistant"]
    assert msgs[-1].id == result.assistant_message_id
    live = service._live[info.id]
    assert not live.dropped and live.state.n_tokens == live.cursor.n_tokens == msgs[-1].token_end


@pytest.fixture
async def second_store(db_url, tmp_path):
    s = await migrated_store(db_url, tmp_path / "data")
    yield s
    await s.close()


async def test_two_services_on_one_database_keep_the_stream_tiled(service, store, second_store, tiny_chat):
    other = make_service(tiny_chat, second_store, SMALL_MEMORY)
    info = await service.create("shared")
    for svc in (service, other, service, other, other, service):
        await svc.reply(info.id, LONG, PARAMS)  # each reads the other's commits before its turn
    msgs = await _check_session(service, store, info.id)
    assert len(msgs) == 12


async def test_a_commit_behind_another_process_is_refused_and_retry_works(service, store, second_store, tiny_chat):
    other = make_service(tiny_chat, second_store, SMALL_MEMORY)
    info = await service.create("raced")
    await service.reply(info.id, LONG, PARAMS)
    racing = other.turn(info.id, LONG, PARAMS).stream()
    await anext(racing)  # past its checks, replying from the stream as it was
    await service.reply(info.id, "Meanwhile, in the first process. " + LONG, PARAMS)
    with pytest.raises(SessionConflictError, match="retry"):
        async for _ in racing:
            pass
    assert info.id not in other._live
    await _check_session(service, store, info.id)
    await other.reply(info.id, "The retry. " + LONG, PARAMS)
    msgs = await _check_session(service, store, info.id)
    assert [m.content for m in msgs][-2].startswith("The retry.")


async def _empty_kb(store) -> int:
    async with store.sessions() as db:
        kb = await KnowledgeBaseRepository(db).create("still-ingesting")
        await db.commit()
        return kb.id


async def test_sessions_answer_over_a_knowledge_base_with_no_blocks_yet(service, store):
    kb = await _empty_kb(store)
    info = await service.create("reader", system="Answer from the documents.", kb_ids=[kb])
    msgs, _ = await _rows(store, info.id)
    assert [m.role for m in msgs] == ["system"]
    result = await service.reply(info.id, "What do the documents say?", PARAMS, trace=True)
    assert result.assistant_message_id is not None and result.citations == []
    assert service._live[info.id].waiting_kbs == [kb]
    async with store.writer(Owner.kb(kb), service.layout):  # its first commit stores the layout
        pass
    await service.reply(info.id, "And now?", PARAMS)
    live = service._live[info.id]
    assert live.waiting_kbs == [] and [k for k, _ in live.kb_sources] == [kb]
    assert live.source in live.state.memory.sources and live.kb_sources[0][1] in live.state.memory.sources
    await _check_session(service, store, info.id)


async def test_a_turn_cut_by_the_time_limit_is_recorded_truncated(service, store, monkeypatch):
    from memllm_api import generation

    clock = itertools.count(1.0)  # every reading of the clock is one second later
    monkeypatch.setattr(generation, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    info = await service.create("slow")
    core = SimpleNamespace(api=SimpleNamespace(request_timeout_s=8), chat=service)
    params = SamplingParams(max_tokens=60, ignore_eos=True)
    gen = generation.TurnGeneration(core, info.id, "Tell me a long story.", params)
    seen = [piece async for piece in gen.stream()]
    out = gen.outcome
    assert out.finish_reason == "length" and out.message_id is not None
    assert 0 < out.completion_tokens < 60
    msgs = await _check_session(service, store, info.id)
    assert msgs[-1].id == out.message_id and msgs[-1].role == "assistant"
    assert msgs[-1].content == out.text == "".join(seen)


async def test_a_turn_that_never_started_within_the_time_limit_fails(service, store):
    from memllm_api import generation
    from memllm_api.errors import ApiError

    info = await service.create("queued")
    core = SimpleNamespace(api=SimpleNamespace(request_timeout_s=0), chat=service)
    gen = generation.TurnGeneration(core, info.id, "Hello?", PARAMS)
    with pytest.raises(ApiError) as err:
        async for _ in gen.stream():
            pass
    assert err.value.status == 503
    msgs, _ = await _rows(store, info.id)
    assert msgs == []

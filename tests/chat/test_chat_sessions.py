"""Chat sessions on a tiny random model, a real SQLite file and real FAISS indexes."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from chat_helpers import SMALL_MEMORY, make_service, migrated_store
from sqlalchemy import select

from memllm.attention import StreamingAttention
from memllm.chat import ChatError, SessionNotFoundError
from memllm.sampling import SamplingParams
from memllm_storage.models import MemoryBlockRow, Message

PARAMS = SamplingParams(max_tokens=10)


async def _rows(store, session_id):
    async with store.sessions() as db:
        msgs = (
            (await db.execute(select(Message).where(Message.session_id == session_id).order_by(Message.ordinal)))
            .scalars()
            .all()
        )
        blocks = (
            (
                await db.execute(
                    select(MemoryBlockRow).where(MemoryBlockRow.session_id == session_id).order_by(MemoryBlockRow.id)
                )
            )
            .scalars()
            .all()
        )
        return list(msgs), list(blocks)


def _check_stream(msgs, blocks, token_count, mem=SMALL_MEMORY):
    """Messages tile the stream; blocks tile [sinks, end) once each, each tagged with its message."""
    pos = 0
    for m in msgs:
        assert m.token_start == pos and m.token_end > m.token_start, (m.ordinal, m.token_start, pos)
        assert len(m.meta["ids"]) == m.token_end - m.token_start
        pos = m.token_end
    assert pos == token_count
    pos = mem.sinks
    by_id = {m.id: m for m in msgs}
    for b in blocks:
        assert (b.token_start, b.token_end) == (pos, pos + mem.block_size)
        owner = by_id[b.message_id]
        assert owner.token_start <= b.token_start < owner.token_end
        pos = b.token_end
    assert token_count - pos <= mem.window + mem.chunk  # what is not in a block is in the live window


async def test_turns_commit_messages_and_blocks_together(service, store):
    info = await service.create("alice", system="Be brief.")
    for i in range(4):
        result = await service.reply(info.id, f"Note {i}: the locker code is {4000 + i}.", PARAMS)
        assert result.committed and result.completion_tokens > 0 and result.ttft_s is not None
    info = await service.get(info.id)
    msgs, blocks = await _rows(store, info.id)
    assert [m.role for m in msgs] == ["system"] + ["user", "assistant"] * 4
    assert msgs[1].content == "Note 0: the locker code is 4000."
    assert info.message_count == 9 and len(blocks) >= 3
    _check_stream(msgs, blocks, info.token_count)
    live = service._live[info.id]
    assert live.state.n_tokens == info.token_count
    assert live.source.num_blocks() == len(blocks) and not live.source.pending
    assert live.state.evicted_blocks == len(blocks)


async def test_blocks_leave_the_window_with_the_commit_not_at_the_next_turn(service, store, tiny_chat):
    """After a message is read (history import, a turn), the blocks that the next read would push
    out of the window have already left and are committed: the next turn does not wait for them.
    A first message longer than the window: its blocks start after the sinks (they used to be
    recorded from position 0) and a restart rebuilds the same window."""
    info = await service.create("carol")
    text = " ".join(f"word{i}" for i in range(70))  # several chunks: the last one overfills the window
    await service.append_messages(info.id, [{"role": "user", "content": text}])
    live = service._live[info.id]
    state = live.state
    assert state.buf.length - state.n_sinks <= SMALL_MEMORY.window
    msgs, blocks = await _rows(store, info.id)
    assert state.evicted_blocks == len(blocks) > 0 and not live.source.pending
    _check_stream(msgs, blocks, state.n_tokens)
    evicted = state.evicted_blocks
    rebuilt = (await make_service(tiny_chat, store)._get_live(info.id)).state
    assert (rebuilt.n_tokens, rebuilt.buf.length, rebuilt.local_start, rebuilt.evicted_blocks) == (
        state.n_tokens,
        state.buf.length,
        state.local_start,
        state.evicted_blocks,
    )
    n = state.buf.length  # layer 0 keys depend only on the tokens: the same tokens in the same slots
    assert torch.allclose(rebuilt.buf.raw[0, :, :, :n], state.buf.raw[0, :, :, :n], atol=1e-5)
    await service.reply(info.id, "Hi", SamplingParams(max_tokens=1))
    msgs, blocks = await _rows(store, info.id)
    assert state.evicted_blocks == len(blocks) >= evicted
    _check_stream(msgs, blocks, state.n_tokens)


async def test_restart_rebuilds_the_same_window_without_duplicating_blocks(service, store, tiny_chat):
    info = await service.create("bob")
    for i in range(3):
        await service.reply(info.id, f"Message number {i} with a few words of text.", PARAMS)
    old = service._live[info.id].state
    _, blocks_before = await _rows(store, info.id)

    restarted = make_service(tiny_chat, store)  # empty cache: rebuilds from rows
    live = await restarted._get_live(info.id)
    new = live.state
    assert (new.n_tokens, new.buf.length, new.local_start, new.evicted_blocks) == (
        old.n_tokens,
        old.buf.length,
        old.local_start,
        old.evicted_blocks,
    )
    n = old.buf.length
    # layer 0 keys depend only on the tokens: the rebuilt window holds exactly the same tokens
    assert torch.allclose(new.buf.raw[0, :, :, :n], old.buf.raw[0, :, :, :n], atol=1e-5)
    _, blocks_after_rebuild = await _rows(store, info.id)
    assert len(blocks_after_rebuild) == len(blocks_before)

    await restarted.reply(info.id, "And one more message after the restart.", PARAMS)
    info = await restarted.get(info.id)
    msgs, blocks = await _rows(store, info.id)
    assert len(blocks) > len(blocks_before)
    _check_stream(msgs, blocks, info.token_count)


async def test_ephemeral_turn_records_nothing(service, store):
    info = await service.create("carol")
    for i in range(3):
        await service.reply(info.id, f"Fact {i}: the sky was grey on day {i}.", PARAMS)
    before = await _rows(store, info.id)
    n = service._live[info.id].state.n_tokens
    raw = service._live[info.id].state.buf.raw.clone()
    long_question = "What was the weather? " * 20  # long enough to evict blocks from the copy
    result = await service.reply(info.id, long_question, PARAMS, ephemeral=True, trace=True)
    assert not result.committed and result.completion_tokens > 0
    after = await _rows(store, info.id)
    assert [m.id for m in after[0]] == [m.id for m in before[0]]
    assert [b.id for b in after[1]] == [b.id for b in before[1]]
    live = service._live[info.id]
    assert live.state.n_tokens == n and torch.equal(live.state.buf.raw, raw) and not live.source.pending
    assert any(e.source == "session" for e in result.trace)  # it did read the session's memory
    assert any(e.source == "turn" for e in result.trace)  # and its own evicted blocks (not stored)


async def test_interrupted_turn_is_not_recorded(service, store):
    info = await service.create("dave")
    await service.reply(info.id, "First message, answered in full.", PARAMS)
    before = await _rows(store, info.id)
    turn = service.turn(info.id, "This one is cut short " * 5, SamplingParams(max_tokens=30))
    agen = turn.stream()
    async for _ in agen:
        break
    await agen.aclose()
    assert info.id not in service._live
    after = await _rows(store, info.id)
    assert len(after[0]) == len(before[0]) and len(after[1]) == len(before[1])
    await service.reply(info.id, "The next turn still works.", PARAMS)
    info = await service.get(info.id)
    msgs, blocks = await _rows(store, info.id)
    assert len(msgs) == len(before[0]) + 2
    _check_stream(msgs, blocks, info.token_count)


async def test_session_crud_history_paging_and_delete(service, store):
    a = await service.create("one", kb_ids=[], meta={"topic": "x"})
    b = await service.create("two")
    with pytest.raises(ChatError):
        await service.create("one")
    assert [s.name for s in await service.list()] == ["one", "two"]
    assert (await service.resolve("one")).id == a.id
    assert (await service.resolve(f"#{b.id}")).name == "two"
    for odd in ("#²", "#" + "9" * 5000):  # not ids: looked up as names, not found, no crash
        with pytest.raises(SessionNotFoundError):
            await service.resolve(odd)
    for i in range(3):
        await service.reply(a.id, f"Question {i}?", SamplingParams(max_tokens=3))
    page = await service.history(a.id, limit=4)
    assert [m.ordinal for m in page] == [2, 3, 4, 5]
    older = await service.history(a.id, limit=4, before=page[0].ordinal)
    assert [m.ordinal for m in older] == [0, 1]
    src_dir = service._live[a.id].source.directory
    assert any(src_dir.iterdir())
    assert await service.delete(a.id)
    assert not src_dir.exists()
    msgs, blocks = await _rows(store, a.id)
    assert msgs == [] and blocks == []
    with pytest.raises(SessionNotFoundError):
        await service.resolve("one")
    assert not await service.delete(a.id)
    assert [s.name for s in await service.list()] == ["two"]


async def test_export_import_round_trip(service, store, tmp_path):
    a = await service.create("orig", system="System text.", meta={"owner": "me"})
    for i in range(3):
        await service.reply(a.id, f"Remember item {i}: a {['red', 'blue', 'green'][i]} box.", PARAMS)
    data = await service.export(a.id)
    path = tmp_path / "s.json"
    path.write_text(json.dumps(data))
    copy = await service.import_(json.loads(path.read_text()), name="copy")
    assert copy.name == "copy" and copy.meta == {"owner": "me"}
    orig_msgs, _ = await _rows(store, a.id)
    copy_msgs, copy_blocks = await _rows(store, copy.id)
    assert [(m.role, m.content) for m in copy_msgs] == [(m.role, m.content) for m in orig_msgs]
    assert [m.created_at for m in copy_msgs] == [m.created_at for m in orig_msgs]
    _check_stream(copy_msgs, copy_blocks, copy.token_count)
    assert copy_blocks  # memory was rebuilt by reading the messages
    with pytest.raises(ChatError):
        await service.import_({"format": "other"})
    with pytest.raises(ChatError):
        await service.import_({"format": data["format"], "messages": [{"role": 1}]})


async def test_sessions_are_isolated(service, store):
    """Planted facts: each session retrieves only its own blocks, never the other's."""
    facts = {"red": "The vault code is 1111.", "blue": "The vault code is 9999."}
    ids = {}
    for name, fact in facts.items():
        ids[name] = (await service.create(name)).id
        await service.reply(ids[name], fact, PARAMS)
        for i in range(3):
            await service.reply(ids[name], f"Unrelated chatter number {i} about the weather.", PARAMS)
    own_blocks = {}
    for name, sid in ids.items():
        _, blocks = await _rows(store, sid)
        own_blocks[name] = {b.id for b in blocks}
    assert own_blocks["red"] and own_blocks["blue"] and not (own_blocks["red"] & own_blocks["blue"])
    for name, sid in ids.items():
        result = await service.reply(sid, "What is the vault code?", PARAMS, trace=True)
        session_blocks = {e.block_id for e in result.trace if e.source == "session"}
        assert session_blocks, "the reply retrieved no session memory"
        assert session_blocks <= own_blocks[name]
        other = "blue" if name == "red" else "red"
        assert not session_blocks & own_blocks[other]
        # provenance of every traced block points at this session's messages
        msgs, _ = await _rows(store, sid)
        assert {e.message_id for e in result.trace if e.source == "session"} <= {m.id for m in msgs}


async def test_window_mode_sessions_keep_no_memory(tiny_chat, store):
    svc = make_service(tiny_chat, store, mode="window")
    info = await svc.create("plain")
    for i in range(3):
        await svc.reply(info.id, f"Window only turn {i} with some words.", PARAMS)
    msgs, blocks = await _rows(store, info.id)
    assert len(msgs) == 6 and blocks == []
    again = make_service(tiny_chat, store, mode="window")
    live = await again._get_live(info.id)
    assert live.state.n_tokens == (await again.get(info.id)).token_count
    assert live.state.buf.length - live.state.n_sinks <= SMALL_MEMORY.window
    with pytest.raises(ChatError):
        make_service(tiny_chat, store, mode="full")


def test_stream_slice_refuses_missing_ids():
    from memllm.chat.service import _stream_slice

    class Row:
        id, token_start, token_end, meta = 1, 0, 3, {"ids": [1, 2, 3]}

    assert _stream_slice([Row()], 1, 3) == [2, 3]
    with pytest.raises(RuntimeError):
        _stream_slice([Row()], 0, 5)
    Row.meta = {}
    with pytest.raises(RuntimeError):
        _stream_slice([Row()], 0, 3)
    assert np.array_equal(np.array(_stream_slice([], 0, 0)), np.array([]))


async def test_turns_reuse_retrieved_blocks_exactly_even_when_staged_ids_come_back(
    tiny_chat, store, tmp_path, monkeypatch
):
    """Turns and chunks reuse the blocks of the previous search (memllm.attention), also while a
    long message's evicted blocks are searchable mid-turn under provisional ids: the replies equal
    those of a session that fetches every block on every search, and the final state too, up to the
    order of the float sums (the reused blocks keep their places, new ones fill the places left)."""
    long_text = " ".join(f"fact{i} is {i * 7}" for i in range(40))  # several chunks: blocks leave mid-read

    async def converse(svc):
        info = await svc.create("reuse")
        replies = []
        for i in range(4):
            replies.append((await svc.reply(info.id, f"Turn {i}. {long_text} What was fact{3 + i}?", PARAMS)).text)
        return replies, svc._live[info.id].state

    replies, state = await converse(make_service(tiny_chat, store))
    plain_store = await migrated_store(f"sqlite+aiosqlite:///{tmp_path / 'plain.db'}", tmp_path / "plain")
    try:
        with monkeypatch.context() as m:
            m.setattr(StreamingAttention, "_gather_blocks", StreamingAttention._fetch_blocks)
            plain_replies, plain = await converse(make_service(tiny_chat, plain_store))
    finally:
        await plain_store.close()
    assert replies == plain_replies
    n = state.buf.length
    assert n == plain.buf.length and state.n_tokens == plain.n_tokens
    for name in ("raw", "rot", "val", "mass"):
        got, want = getattr(state.buf, name)[:, :, :, :n], getattr(plain.buf, name)[:, :, :, :n]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3, msg=name)


async def test_sessions_read_with_the_chat_memory_changes(tiny_chat, store, monkeypatch):
    """``MEMLLM_CHAT_MEMORY`` changes the engine's memory settings for chat sessions (their live states
    and the service's own); explicit ``memory_changes`` win, and a bad spec is refused by name."""
    from memllm.chat.service import ChatService
    from memllm.engine import Engine
    from memllm.settings import get_settings

    monkeypatch.setenv("MEMLLM_CHAT_MEMORY", "top_k=2,search_group=2")
    get_settings.cache_clear()
    try:
        svc = ChatService(Engine(tiny_chat, SMALL_MEMORY), store)
        info = await svc.create("profile")
        await svc.reply(info.id, "Hello there.", PARAMS)
        state = svc._live[info.id].state
        assert (state.mem.top_k, state.mem.search_group) == (2, 2) == (svc.memory.top_k, svc.memory.search_group)
        assert state.mem.window == SMALL_MEMORY.window  # the rest as the engine reads
        kept = ChatService(Engine(tiny_chat, SMALL_MEMORY), store, memory_changes={})
        assert kept.memory.top_k == SMALL_MEMORY.top_k and kept.memory.search_group == 1
        monkeypatch.setenv("MEMLLM_CHAT_MEMORY", "none")
        get_settings.cache_clear()
        assert ChatService(Engine(tiny_chat, SMALL_MEMORY), store).memory.top_k == SMALL_MEMORY.top_k
        monkeypatch.setenv("MEMLLM_CHAT_MEMORY", "top_k=many")
        get_settings.cache_clear()
        with pytest.raises(ValueError, match="MEMLLM_CHAT_MEMORY"):
            ChatService(Engine(tiny_chat, SMALL_MEMORY), store)
    finally:
        get_settings.cache_clear()


def test_the_default_chat_memory_changes_are_valid_settings():
    from memllm.attention import check_memory_settings
    from memllm.settings import CHAT_MEMORY, MemorySettings, parse_memory_changes

    changes = parse_memory_changes(CHAT_MEMORY)
    assert changes == {"top_k": 8, "search_group": 5}
    check_memory_settings(dataclasses.replace(MemorySettings(), **changes))

"""Live states spilled to disk and restored (memllm/chat/spill.py): a tiny random model, a real
SQLite file and real FAISS indexes."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import pytest
import torch
from chat_helpers import SMALL_MEMORY, make_service

from memllm.chat import ChatError
from memllm.chat.spill import Snapshot
from memllm.sampling import SamplingParams
from memllm.settings import Settings

PARAMS = SamplingParams(max_tokens=6)


async def _talk(svc, session_id: int, turns: int, tag: str) -> None:
    for i in range(turns):
        await svc.reply(session_id, f"{tag} note {i}: the locker code is {4000 + i}.", PARAMS)


def _assert_same(state, snap: Snapshot) -> None:
    n = state.buf.length
    assert (state.n_tokens, n, state.local_start, state.evicted_blocks) == (
        snap.n_tokens,
        snap.raw.shape[3],
        snap.local_start,
        snap.evicted_blocks,
    )
    for name in ("raw", "rot", "val", "mass"):
        assert torch.equal(getattr(state.buf, name)[:, :, :, :n], getattr(snap, name)), name


def _count_rereads(svc) -> list[int]:
    calls: list[int] = []
    reread = svc._reread

    def counting(*args):
        calls.append(args[-1])
        return reread(*args)

    svc._reread = counting
    return calls


async def test_a_session_that_leaves_the_cache_comes_back_exactly(tiny_chat, store):
    svc = make_service(tiny_chat, store, max_live=1)
    a = await svc.create("a", system="Be brief.")
    await _talk(svc, a.id, 3, "alpha")
    assert svc._live[a.id].state.evicted_blocks > 0  # the window has moved: blocks are in memory
    before = Snapshot.of(svc._live[a.id].state)

    b = await svc.create("b")
    await _talk(svc, b.id, 1, "beta")  # opening b pushes a out of the cache, to disk (a task)
    assert a.id not in svc._live

    rereads = _count_rereads(svc)
    live = await svc._get_live(a.id)  # waits for the write if it is still going on
    assert rereads == [] and svc.spill.path(a.id).exists()
    _assert_same(live.state, before)
    await svc.wait_spills()
    assert b.id not in svc._live and svc.spill.path(b.id).exists()  # max_live=1: b went out in turn

    await _talk(svc, a.id, 1, "alpha again")  # the restored state reads and commits on
    info = await svc.get(a.id)
    assert live.state.n_tokens == info.token_count and info.message_count == 1 + 2 * 4


async def test_close_spills_a_restart_restores_and_a_later_commit_makes_the_spill_stale(tiny_chat, store):
    svc = make_service(tiny_chat, store)
    a = await svc.create("a")
    await _talk(svc, a.id, 3, "alpha")
    before = Snapshot.of(svc._live[a.id].state)
    await svc.close()
    assert not svc._live and svc.spill.path(a.id).exists()

    restarted = make_service(tiny_chat, store)
    rereads = _count_rereads(restarted)
    _assert_same((await restarted._get_live(a.id)).state, before)
    assert rereads == []
    await _talk(restarted, a.id, 1, "after the restart")  # commits a turn; no close: a crash

    crashed = make_service(tiny_chat, store)
    rereads = _count_rereads(crashed)
    live = await crashed._get_live(a.id)
    assert len(rereads) == 1  # the spill no longer matched the stream: the window was re-read
    assert not crashed.spill.path(a.id).exists()  # and the stale file is gone
    assert live.state.n_tokens == (await crashed.get(a.id)).token_count


async def test_a_spill_from_other_memory_settings_or_a_damaged_file_is_not_used(tiny_chat, store, caplog):
    svc = make_service(tiny_chat, store)
    a = await svc.create("a")
    await _talk(svc, a.id, 2, "alpha")
    await svc.close()

    other = make_service(tiny_chat, store, dataclasses.replace(SMALL_MEMORY, top_k=3))
    rereads = _count_rereads(other)
    await other._get_live(a.id)
    assert len(rereads) == 1 and not other.spill.path(a.id).exists()
    await other.close()  # spilled again, stamped with top_k=3

    path = other.spill.path(a.id)
    path.write_bytes(path.read_bytes()[:100])  # torn
    damaged = make_service(tiny_chat, store, dataclasses.replace(SMALL_MEMORY, top_k=3))
    rereads = _count_rereads(damaged)
    live = await damaged._get_live(a.id)
    assert len(rereads) == 1 and not path.exists()
    assert "unreadable spilled state" in caplog.text
    await damaged.reply(a.id, "Still there?", PARAMS)
    assert live.state.n_tokens == (await damaged.get(a.id)).token_count


async def test_the_spill_keeps_the_latest_states_and_a_deleted_session_takes_its_file(tiny_chat, store):
    svc = make_service(tiny_chat, store, max_live=1, spill=2)
    ids = []
    for name in ("a", "b", "c", "d"):
        info = await svc.create(name)
        await _talk(svc, info.id, 1, name)
        ids.append(info.id)
    await svc.wait_spills()
    # a, b and c left the cache in that order; only the two latest spills are kept
    assert [p.parent.name for p in svc.spill.files()] == [f"session-{ids[1]}", f"session-{ids[2]}"]
    assert await svc.delete(ids[2])
    assert [p.parent.name for p in svc.spill.files()] == [f"session-{ids[1]}"]
    rereads = _count_rereads(svc)
    await svc._get_live(ids[0])  # its spill was dropped: re-read
    assert len(rereads) == 1


async def test_spill_settings(tiny_chat, store):
    settings = Settings.from_env({"MEMLLM_CHAT_MAX_LIVE": "9", "MEMLLM_CHAT_SPILL": "0"})
    assert (settings.chat_max_live, settings.chat_spill) == (9, 0)
    assert make_service(tiny_chat, store, spill=0).spill is None
    assert make_service(tiny_chat, store, dataclasses.replace(SMALL_MEMORY, mode="window")).spill is None
    with pytest.raises(ChatError, match="max_live"):
        make_service(tiny_chat, store, max_live=0)


async def test_a_failed_spill_leaves_no_file_and_costs_only_a_reread(tiny_chat, store, monkeypatch, caplog):
    svc = make_service(tiny_chat, store)
    a = await svc.create("a")
    await _talk(svc, a.id, 2, "alpha")
    folder = svc.spill.path(a.id).parent
    stale = folder / "live-state.tmp-999999"  # left by a process that died while writing
    stale.write_bytes(b"partial")
    an_hour_ago = time.time() - 3600
    os.utime(stale, (an_hour_ago, an_hour_ago))

    def disk_full(obj, path):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(torch, "save", disk_full)
        await svc.close()
    assert "could not spill the live state" in caplog.text
    assert sorted(p.name for p in folder.glob("live-state*")) == []

    restarted = make_service(tiny_chat, store)
    rereads = _count_rereads(restarted)
    live = await restarted._get_live(a.id)
    assert len(rereads) == 1 and live.state.n_tokens == (await restarted.get(a.id)).token_count

"""A crash mid-conversation loses no committed turn: a child process is SIGKILLed during a turn
(while generating, or at storage crash points of the turn's commit); the parent restarts the
session from the database and continues it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from chat_helpers import make_service
from sqlalchemy import select
from test_chat_sessions import PARAMS, _check_stream, _rows

from memllm_storage.models import ChatSession

CHILD = Path(__file__).parent / "chat_crash_child.py"
TURNS = 3


def _run_child(db_url, data_dir, scenario, env_extra, stop_line):
    env = {**os.environ, **env_extra, "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), db_url, str(data_dir), "s", str(TURNS), scenario],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if line.startswith(stop_line):
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, (lines, proc.stderr.read()[-3000:])
    return lines


@pytest.mark.parametrize(
    ("scenario", "env", "stop_line", "turns_kept"),
    [
        ("midturn", {}, "MIDTURN", TURNS),  # killed while the reply streams: turn in flight is lost
        # killed right after the commit, before the indexes were updated: the turn is kept
        (
            "crashpoint",
            {"MEMLLM_CRASHPOINT": "writer.after_commit", "MEMLLM_CRASHPOINT_SKIP": str(TURNS)},
            "CRASHPOINT",
            TURNS + 1,
        ),
    ],
    ids=["mid-reply", "after-commit"],
)
async def test_sigkill_mid_turn_loses_no_committed_turn(
    tiny_chat, store, db_url, tmp_path, scenario, env, stop_line, turns_kept
):
    lines = _run_child(db_url, tmp_path / "data", scenario, env, stop_line)
    assert [x for x in lines if x.startswith("COMMITTED")] == [f"COMMITTED {i}" for i in range(TURNS)]

    service = make_service(tiny_chat, store)  # the restarted process
    info = await service.resolve("s")
    msgs, blocks = await _rows(store, info.id)
    assert [m.role for m in msgs] == ["user", "assistant"] * turns_kept
    assert msgs[0].content.startswith("Turn 0:")
    _check_stream(msgs, blocks, info.token_count)
    async with store.sessions() as db:
        assert (await db.execute(select(ChatSession.token_count))).scalar_one() == msgs[-1].token_end

    live = await service._get_live(info.id)
    assert live.state.n_tokens == info.token_count
    assert live.source.num_blocks() == len(blocks)  # indexes repaired to match the rows
    await service.reply(info.id, "After the crash: are you still there?", PARAMS)
    info = await service.get(info.id)
    msgs, blocks = await _rows(store, info.id)
    assert len(msgs) == 2 * turns_kept + 2
    _check_stream(msgs, blocks, info.token_count)

"""The passkey prompt: exact length, the protocol's lines, no blank line where a filler part is empty."""

from __future__ import annotations

import json

import pytest

from memllm.bench import passkey
from memllm.bench.common import machine_info, machine_label
from memllm.bench.passkey import INSTRUCTION, QUESTION, build_prompt, needle, run
from memllm.engine import Engine
from memllm.settings import MemorySettings


@pytest.fixture(scope="module")
def engine(real_model):
    return Engine(real_model, MemorySettings())


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("filler", ["grass", "essays"])
def test_prompt_lines(engine, depth, filler):
    prompt = build_prompt(engine, 1024, depth, key=48213, filler=filler, offset=7919)
    assert len(prompt.ids) == 1024
    text = engine.tokenizer.decode(prompt.ids)
    lines = text.split("\n")
    assert lines[0] == INSTRUCTION and lines[-1] == QUESTION
    assert engine.tokenizer.decode(prompt.ids[slice(*prompt.needle_span)]) == needle(48213)
    at = lines.index(needle(48213))
    # depth 0: the needle follows the instruction; depth 1: it precedes the question; else filler both sides
    if depth == 0:
        assert at == 1
    elif depth == 1:
        assert at == len(lines) - 2
    else:
        assert 1 < at < len(lines) - 2
    if filler == "grass":  # essay filler has its own paragraph breaks
        assert "" not in lines and len(lines) == 4 + (0 < depth < 1)


def test_needle_position_follows_depth(engine):
    starts = [build_prompt(engine, 2048, d, key=11111, filler="grass").needle_span[0] for d in (0.25, 0.5, 0.75)]
    assert starts[0] < starts[1] < starts[2]
    assert abs(starts[1] - 1024) < 40  # the middle of the filler, give or take the fixed lines


def test_too_short(engine):
    with pytest.raises(ValueError, match="too short"):
        build_prompt(engine, 40, 0.5, key=11111, filler="grass")


@pytest.mark.slow
def test_workers_give_the_answers_of_one_process(engine, tmp_path, monkeypatch):
    """Trials run in two worker processes: same keys and answers as in this process."""
    grid = dict(lengths=[1536], depths=[0.5, 1.0], trials=1, filler="grass", modes=["full"])
    run(engine, **grid, out=tmp_path / "one.json")
    monkeypatch.setenv("MEMLLM_DTYPE", "float32")  # workers load the configured model: the fixture's dtype

    def not_here(*args, **kwargs):
        raise AssertionError("a trial ran in the parent process")

    monkeypatch.setattr(passkey, "run_trial", not_here)  # the spawned workers import their own copy
    run(engine, **grid, out=tmp_path / "two.json", workers=2)

    def trials(name):
        got = json.loads((tmp_path / name).read_text())["trials"]
        return sorted((t["depth"], t["key"], t["answer"], t["passed"]) for t in got)

    assert trials("one.json") == trials("two.json")
    assert len(trials("one.json")) == 2


def test_a_split_grid_asks_the_keys_of_the_whole_grid(engine, tmp_path, monkeypatch):
    """Depths run apart (two commands, as on a two-core machine) get the keys one run of every
    depth gets, so split results can be pooled and rerun trial by trial."""

    def echo_key(engine, prompt, mode, **overrides):
        return {"answer": str(prompt.key), "passed": True, "seconds": 0.0}

    monkeypatch.setattr(passkey, "run_trial", echo_key)
    grid = dict(lengths=[1024], trials=2, filler="grass", modes=["memory"])

    def keys(name, depths):
        run(engine, **grid, depths=depths, out=tmp_path / name)
        got = json.loads((tmp_path / name).read_text())["trials"]
        return {(t["depth"], t["trial"]): t["key"] for t in got}

    whole = keys("whole.json", [0.0, 0.5, 1.0])
    split = keys("low.json", [0.0]) | keys("high.json", [0.5, 1.0])
    assert split == whole
    assert len(set(whole.values())) == 6


def test_the_summary_and_heatmap_cover_every_length_the_file_holds(engine, tmp_path, monkeypatch):
    """A grid split by length into one file (two commands): the second run's table and heatmap hold
    the first run's length and depths too, not only its own."""
    monkeypatch.setattr(
        passkey, "run_trial", lambda engine, prompt, mode, **o: {"answer": "", "passed": True, "seconds": 0.0}
    )
    drawn = {}
    monkeypatch.setattr(
        passkey, "plot", lambda trials, modes, lengths, depths, path: drawn.update(lengths=lengths, depths=depths)
    )
    out = tmp_path / "grid.json"
    run(engine, lengths=[1024], depths=[0.0], trials=1, filler="grass", modes=["memory"], out=out)
    rows = run(engine, lengths=[1536], depths=[0.5], trials=1, filler="grass", modes=["memory"], out=out)
    assert [r["length"] for r in rows] == [1024, 1536]
    assert drawn == {"lengths": [1024, 1536], "depths": [0.0, 0.5]}


def test_each_trial_names_the_machine_it_ran_on(engine, tmp_path, monkeypatch):
    """A file resumed on another machine mixes answers of two CPUs or dtypes (docs/RESULTS.md,
    2026-12-05/1406098: bfloat16 and float32 trials in one file): every trial records where it
    ran, and a summary row names each machine its trials came from, "unrecorded" for trials
    written before the field."""
    monkeypatch.setattr(
        passkey, "run_trial", lambda engine, prompt, mode, **o: {"answer": "", "passed": True, "seconds": 0.0}
    )
    monkeypatch.setattr(passkey, "plot", lambda *a: None)
    out = tmp_path / "grid.json"
    grid = dict(lengths=[1024], filler="grass", modes=["memory"], out=out)
    run(engine, depths=[0.0], trials=1, **grid)
    saved = json.loads(out.read_text())
    here = machine_label(machine_info())
    assert [t["ran_on"] for t in saved["trials"]] == [here]
    del saved["trials"][0]["ran_on"]  # as an earlier version wrote it
    out.write_text(json.dumps(saved))
    rows = run(engine, depths=[0.0, 1.0], trials=1, **grid)
    assert [r["ran on"] for r in rows] == [" + ".join(sorted([here, passkey.UNRECORDED]))]
    assert [t.get("ran_on") for t in json.loads(out.read_text())["trials"]] == [None, here]


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_the_oracle_keeps_the_sinks_the_needles_block_and_the_window(engine, depth):
    mem = MemorySettings(sinks=64, window=512, block_size=128)
    prompt = build_prompt(engine, 4096, depth, key=48213, filler="essays", offset=7919)
    kept = passkey.oracle_positions(4096, prompt.needle_span, mem)
    assert kept == sorted(set(kept)) and set(range(64)) | set(range(4096 - 512, 4096)) <= set(kept)
    start, end = prompt.needle_span
    # a run of 128 consecutive positions holds the whole needle
    assert any(set(range(s, s + 128)) <= set(kept) for s in range(max(0, end - 128), start + 1))
    # three disjoint parts in the middle; at either end the needle's block merges with the sinks or window
    assert (len(kept) == 64 + 128 + 512) if depth == 0.5 else (len(kept) < 64 + 128 + 512)
    oracle = passkey.oracle_prompt(prompt, mem)
    assert oracle.key == prompt.key and oracle.ids == [prompt.ids[i] for i in kept]
    assert oracle.ids[slice(*oracle.needle_span)] == prompt.ids[slice(*prompt.needle_span)]


def test_the_oracle_arm_answers_from_the_short_prompt(engine, tmp_path):
    """An oracle trial is the full-attention trial of ``oracle_prompt``: same answer, recorded as its own arm."""
    grid = dict(lengths=[2048], depths=[0.5], trials=1, filler="grass")
    run(engine, **grid, modes=["oracle"], out=tmp_path / "o.json", window=256, block_size=64)
    (trial,) = json.loads((tmp_path / "o.json").read_text())["trials"]
    assert trial["mode"] == "oracle"
    prompt = build_prompt(engine, 2048, 0.5, trial["key"], "grass")
    short = passkey.oracle_prompt(prompt, MemorySettings(window=256, block_size=64))
    assert len(short.ids) < 512
    direct = passkey.run_trial(engine, short, "full")
    assert direct["answer"] == trial["answer"] and direct["passed"] == trial["passed"]

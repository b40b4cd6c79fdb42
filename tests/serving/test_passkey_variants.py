"""``run_final_variants``: one passkey trial answered under several final-retrieval strategies from
one read gives, per strategy, the answer of a trial run with that strategy from the start."""

from __future__ import annotations

import json

import pytest
from serving_helpers import SMALL, NoTokenizer, prompt, tiny_engine

from memllm.bench import passkey
from memllm.bench.passkey import PasskeyPrompt, run_final_variants, run_trial


class IdsTokenizer(NoTokenizer):
    """Decodes ids as their numbers, so an answer's first integer is its first token id."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(str(i) for i in ids)


@pytest.fixture
def engine(tiny):
    engine = tiny_engine(tiny)
    engine.tokenizer = IdsTokenizer()
    return engine


STRATEGIES = ["mean", "heads", "last", "mean+last"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_strategy_answers_as_a_trial_of_its_own(engine, seed):
    trial = PasskeyPrompt(ids=prompt(seed, 150), key=7, needle_span=(0, 0))
    got = run_final_variants(engine, trial, STRATEGIES, max_tokens=6)
    assert [r["final_retrieval"] for r in got] == STRATEGIES
    for r in got:
        alone = run_trial(engine, trial, "memory", max_tokens=6, final_retrieval=r["final_retrieval"])
        assert r["answer"] == alone["answer"]
        assert r["passed"] == alone["passed"] == (int(r["answer"].split()[0]) == 7)


def test_the_strategies_see_different_blocks(engine):
    """Guard for the test above: the strategies are not one answer under four names. Over a few
    prompts, per-head search of the question answers differently from the mean somewhere."""
    answers = [
        {
            r["final_retrieval"]: r["answer"]
            for r in run_final_variants(engine, PasskeyPrompt(prompt(s, 150), 7, (0, 0)), STRATEGIES, max_tokens=6)
        }
        for s in range(3)
    ]
    assert any(a["heads"] != a["mean"] for a in answers)


def test_a_prompt_of_one_chunk_has_no_question_forward_to_vary(engine):
    with pytest.raises(ValueError, match="one forward"):
        run_final_variants(engine, PasskeyPrompt(prompt(0, SMALL.chunk), 7, (0, 0)), STRATEGIES)


def test_the_grid_records_one_arm_per_strategy_and_resumes(engine, tmp_path, monkeypatch):
    """Each strategy is an arm (``memory/final=S``) in the JSON and the summary; a rerun with one
    more strategy runs only that one."""
    calls: list[tuple[str, ...]] = []
    real = passkey.run_final_variants

    def counted(engine, prompt, strategies, **kw):
        calls.append(tuple(strategies))
        return real(engine, prompt, strategies, max_tokens=4, **kw)

    monkeypatch.setattr(passkey, "run_final_variants", counted)
    monkeypatch.setattr(
        passkey, "build_prompt", lambda e, n, d, key, f, offset=0: PasskeyPrompt(prompt(n, 150), key, (0, 0))
    )
    out = tmp_path / "grid.json"
    grid = dict(lengths=[150], depths=[0.0, 1.0], trials=1, filler="grass", modes=["memory"], out=out)
    rows = passkey.run(engine, final_retrievals=["mean", "heads"], **grid)
    assert [r["mode"] for r in rows] == ["memory/final=mean", "memory/final=heads"]
    assert all(r["trials"] == 2 for r in rows)
    assert calls == [("mean", "heads")] * 2
    calls.clear()
    rows = passkey.run(engine, final_retrievals=["mean", "heads", "last"], **grid)
    assert calls == [("last",)] * 2
    assert [r["mode"] for r in rows] == ["memory/final=mean", "memory/final=heads", "memory/final=last"]
    trials = json.loads(out.read_text())["trials"]
    assert sorted((t["final_retrieval"], t["depth"]) for t in trials) == sorted(
        (s, d) for s in ("mean", "heads", "last") for d in (0.0, 1.0)
    )


def test_an_unknown_strategy_is_refused_before_any_trial(engine, tmp_path):
    with pytest.raises(ValueError, match="unknown final retrieval"):
        passkey.run(engine, [150], [0.0], 1, "grass", ["memory"], tmp_path / "x.json", final_retrievals=["median"])

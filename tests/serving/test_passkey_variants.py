"""``run_answer_variants``: one passkey trial answered under several question-and-answer settings
from one read gives, per variant, the answer of a trial run with those settings from the start."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from serving_helpers import SMALL, NoTokenizer, prompt, tiny_engine

from memllm.bench import passkey
from memllm.bench.passkey import PasskeyPrompt, parse_variant, run_answer_variants, run_trial


class IdsTokenizer(NoTokenizer):
    """Decodes ids as their numbers, so an answer's first integer is its first token id."""

    def decode(self, ids, skip_special_tokens=True) -> str:
        return " ".join(str(i) for i in ids)


# the question retrieves top_k (3) of the ~15 blocks: which strategy searches decides what it sees
MEM = dataclasses.replace(SMALL, final_top_k=0)


@pytest.fixture
def engine(tiny):
    engine = tiny_engine(tiny, MEM)
    engine.tokenizer = IdsTokenizer()
    return engine


STRATEGIES = ["mean", "heads", "last", "mean+last"]


def _trial(seed: int, n: int = 150) -> PasskeyPrompt:
    return PasskeyPrompt(ids=prompt(seed, n), key=7, needle_span=(0, 0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_each_final_retrieval_answers_as_a_trial_of_its_own(engine, seed):
    variants = [f"final_retrieval={s}" for s in STRATEGIES]
    got = run_answer_variants(engine, _trial(seed), variants, max_tokens=6)
    assert [r["variant"] for r in got] == variants
    for strategy, r in zip(STRATEGIES, got, strict=True):
        alone = run_trial(engine, _trial(seed), "memory", max_tokens=6, final_retrieval=strategy)
        assert r["answer"] == alone["answer"]
        assert r["passed"] == alone["passed"] == (int(r["answer"].split()[0]) == 7)


def test_a_variant_of_the_reads_own_settings_answers_as_the_plain_trial(engine):
    for seed in range(3):
        own = f"top_k={MEM.top_k},final_top_k={MEM.final_top_k},final_retrieval={MEM.final_retrieval}"
        (got,) = run_answer_variants(engine, _trial(seed), [own])
        assert got["answer"] == run_trial(engine, _trial(seed), "memory")["answer"]


def test_the_variants_change_the_answers(engine):
    """Guard for the tests above: the variants are not one answer under several names. Over a few
    prompts, per-head search of the question, and a top-1 search, answer differently somewhere."""
    variants = ["final_retrieval=mean", "final_retrieval=heads", "final_top_k=1"]
    answers = [
        {r["variant"]: r["answer"] for r in run_answer_variants(engine, _trial(s), variants, max_tokens=6)}
        for s in range(3)
    ]
    assert any(a["final_retrieval=heads"] != a["final_retrieval=mean"] for a in answers)
    assert any(a["final_top_k=1"] != a["final_retrieval=mean"] for a in answers)


def test_an_answer_bias_variant_answers_as_a_trial_read_with_it(engine):
    """``answer_memory_bias`` acts only in the question's forward and the decode steps: answering a
    shared read (read at ``memory_bias``) with it is the trial run with it from the start. Guard: over
    a few prompts the biases answer differently somewhere."""
    biases = [-3.0, 0.0, 3.0]
    answers = []
    for seed in range(3):
        got = run_answer_variants(engine, _trial(seed), [f"answer_memory_bias={b}" for b in biases], max_tokens=6)
        for bias, r in zip(biases, got, strict=True):
            alone = run_trial(engine, _trial(seed), "memory", max_tokens=6, answer_memory_bias=bias)
            assert r["answer"] == alone["answer"]
        answers.append({r["answer"] for r in got})
    assert any(len(a) > 1 for a in answers)


def test_perplexity_reads_at_the_reads_bias_only(engine):
    """``memllm bench ppl`` only reads: its token losses change with ``memory_bias`` but not with
    ``answer_memory_bias`` (README: the answer's bias leaves the book perplexity as it was)."""
    from memllm.bench.ppl import token_nll

    ids = prompt(5, 150)
    base = token_nll(engine, ids, "memory")
    assert torch.equal(token_nll(engine, ids, "memory", answer_memory_bias=4.0), base)
    assert not torch.allclose(token_nll(engine, ids, "memory", memory_bias=4.0), base)


def test_a_prompt_of_one_chunk_has_no_question_forward_to_vary(engine):
    with pytest.raises(ValueError, match="one forward"):
        run_answer_variants(engine, _trial(0, SMALL.chunk), ["final_retrieval=heads"])


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("block_size=64", "the shared read fixes"),
        ("window=128", "the shared read fixes"),
        ("memory_bias=0", "the shared read fixes"),  # the read's bias; answers use answer_memory_bias
        ("top_k", "expected FIELD=VALUE"),
        ("colour=red", "expected FIELD=VALUE"),
        ("top_k=many", "not a valid int"),
        ("top_k=64,many", "not a valid int"),
        ("question_heads=18:7,21", "LAYER:HEAD"),
        ("final_retrieval=median", "unknown final_retrieval"),
        ("memory_positions=shuffled", "unknown memory_positions"),
        ("", "empty"),
    ],
)
def test_a_bad_variant_is_refused(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_variant(spec)


def test_a_variant_reads_its_values_as_the_environment_would():
    assert parse_variant("top_k=64, final_retrieval=heads") == {
        "top_k": 64,
        "final_retrieval": "heads",
        "layer_top_k": "",
        "reading_top_k": 0,
    }
    assert parse_variant("answer_memory_bias=-1") == {"answer_memory_bias": -1.0}
    # a list-valued setting keeps its commas: the parts without "=" go on the value before them
    assert parse_variant("question_heads=18:7, 21:8,final_top_k=16") == {
        "question_heads": "18:7,21:8",
        "final_top_k": 16,
    }


def test_the_grid_records_one_arm_per_variant_and_resumes(engine, tmp_path, monkeypatch):
    """Each variant is an arm (``memory/VARIANT``) in the JSON and the summary; a rerun with one
    more variant runs only that one."""
    calls: list[tuple[str, ...]] = []
    real = passkey.run_answer_variants

    def counted(engine, prompt, variants, **kw):
        calls.append(tuple(variants))
        return real(engine, prompt, variants, max_tokens=4, **kw)

    monkeypatch.setattr(passkey, "run_answer_variants", counted)
    monkeypatch.setattr(
        passkey, "build_prompt", lambda e, n, d, key, f, offset=0: PasskeyPrompt(prompt(n, 150), key, (0, 0))
    )
    out = tmp_path / "grid.json"
    grid = dict(lengths=[150], depths=[0.0, 1.0], trials=1, filler="grass", modes=["memory"], out=out)
    two = ["final_retrieval=mean", "top_k=1"]
    rows = passkey.run(engine, variants=two, **grid)
    assert [r["mode"] for r in rows] == ["memory/final_retrieval=mean", "memory/top_k=1"]
    assert all(r["trials"] == 2 for r in rows)
    assert calls == [tuple(two)] * 2
    calls.clear()
    rows = passkey.run(engine, variants=[*two, "final_retrieval=heads"], **grid)
    assert calls == [("final_retrieval=heads",)] * 2
    assert [r["mode"] for r in rows] == [f"memory/{v}" for v in [*two, "final_retrieval=heads"]]
    trials = json.loads(out.read_text())["trials"]
    assert sorted((t["variant"], t["depth"]) for t in trials) == sorted(
        (v, d) for v in [*two, "final_retrieval=heads"] for d in (0.0, 1.0)
    )


def test_a_bad_variant_is_refused_before_any_trial(engine, tmp_path, monkeypatch):
    monkeypatch.setattr(passkey, "run_answer_variants", lambda *a, **k: pytest.fail("a trial ran"))
    with pytest.raises(ValueError, match="unknown final_retrieval"):
        passkey.run(
            engine, [150], [0.0], 1, "grass", ["memory"], tmp_path / "x.json", variants=["final_retrieval=median"]
        )


def test_a_misspelt_mode_is_refused_before_any_trial(engine, tmp_path, monkeypatch):
    monkeypatch.setattr(passkey, "run_trial", lambda *a, **k: pytest.fail("a trial ran"))
    with pytest.raises(ValueError, match=r"unknown passkey mode\(s\) \['windw'\]"):
        passkey.run(engine, [150], [0.0], 1, "grass", ["memory", "windw"], tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_the_recalled_bias_answers_where_the_heads_scored_memory_higher(tiny, monkeypatch):
    """``recalled_memory_bias`` is the bias of the question's forward and every decode step where
    the question's retrieval heads scored memory above the local context (``recall_scores``), and
    ``answer_memory_bias`` elsewhere; the voting pass, before the scores exist, reads at
    ``answer_memory_bias``. Where the heads chose the local context the answer is the plain trial's.
    Guard: both sides occur."""
    from memllm.attention import READ_QUESTION, StreamingAttention

    biases: list[tuple[str, int, float]] = []
    real = StreamingAttention.begin

    def spy(self, n_new):
        real(self, n_new)
        biases.append((self.reading, n_new, self._memory_bias_now))

    monkeypatch.setattr(StreamingAttention, "begin", spy)
    mem = dataclasses.replace(MEM, question_heads="2:1,0:3", final_top_k=3)
    engine = tiny_engine(tiny, mem)
    engine.tokenizer = IdsTokenizer()
    chose = set()
    for seed in range(6):  # 70 tokens: ~5 blocks in memory, so the local blocks win some questions
        biases.clear()
        (got,) = run_answer_variants(engine, _trial(seed, 70), ["recalled_memory_bias=3"], max_tokens=6)
        memory, local = got["recall_scores"]
        want = 3.0 if memory > local else 0.0
        chose.add(want)
        question = [b for reading, _, b in biases if reading == READ_QUESTION]
        assert question == [0.0, want]  # the voting pass, then the question's forward
        steps = [b for _, n, b in biases if n == 1]
        assert len(steps) >= 5 and set(steps) == {want}  # each token read back
        if want == 0.0:
            assert got["answer"] == run_trial(engine, _trial(seed, 70), "memory", max_tokens=6)["answer"]
    assert chose == {0.0, 3.0}


def test_the_recalled_local_block_is_boosted_where_the_heads_chose_the_local_context(tiny, monkeypatch):
    """``recalled_local_bias``: the question's forward and every decode step read the heads' best
    local block louder where they scored the local context at least as high as memory, until an
    eviction moves it (``_boosted_slots``); the voting pass and the read never do. Guard: both sides
    occur, and the boost changes some answer."""
    from memllm.attention import READ_QUESTION, StreamingAttention

    seen: list[tuple[float, str, int, tuple[int, int] | None, int]] = []
    real = StreamingAttention.begin

    def spy(self, n_new):
        real(self, n_new)
        seen.append((self.mem.recalled_local_bias, self.reading, n_new, self._boost_now, self.local_start))

    monkeypatch.setattr(StreamingAttention, "begin", spy)
    mem = dataclasses.replace(MEM, question_heads="2:1,0:3", final_top_k=3)
    engine = tiny_engine(tiny, mem)
    engine.tokenizer = IdsTokenizer()
    chose, changed, kept = set(), False, 0
    for seed in range(6):
        seen.clear()
        off, on = run_answer_variants(
            engine, _trial(seed, 70), ["recalled_local_bias=0", "recalled_local_bias=3"], max_tokens=6
        )
        memory, local = on["recall_scores"]
        boosted = local >= memory
        chose.add(boosted)
        answering = [row[1:] for row in seen if row[0] == 3.0]  # the variant's forwards
        question = [row for row in answering if row[0] == READ_QUESTION]
        assert question[0][2] is None and (question[1][2] is not None) == boosted  # the voting pass, the forward
        steps = [(boost, start) for _, n, boost, start in answering if n == 1]
        assert len(steps) >= 5
        before = question[1][2:]
        for boost, start in steps:
            if not boosted:
                assert boost is None
            elif start == before[1]:  # no eviction since the last forward: the same slots
                assert boost == before[0]
                kept += 1
            else:  # tokens left the window: what remains of the block (``_boosted_slots``), or nothing
                assert boost is None or (before[0] is not None and boost[1] - boost[0] <= before[0][1] - before[0][0])
            before = (boost, start)
        assert all(boost is None for _, reading, n, boost, _ in seen if reading != READ_QUESTION and n > 1)
        assert all(boost is None for bias, _, _, boost, _ in seen if bias == 0.0)
        if not boosted:
            assert on["answer"] == off["answer"]
        changed |= on["answer"] != off["answer"]
    assert chose == {False, True} and changed and kept

"""LoCoMo scoring (official protocol), data loading, and the text-retrieval baseline."""

from __future__ import annotations

import itertools
import random

import pytest

from memllm.chat.baselines import PastTurn, TurnRetriever, format_turns, last_tokens
from memllm.evals.common import eval_data_dir
from memllm.evals.conversations import (
    NOT_MENTIONED,
    LocomoConversation,
    f1_multi,
    f1_score,
    limit_sessions,
    load_locomo,
    merge_results,
    normalize_answer,
    pick_question_indices,
    question_text,
    resolve_option,
    result_payload,
    score_answer,
    select_conversations,
    settings_mismatch,
    spread_order,
    summarize,
)


def test_normalisation_and_stemmed_token_f1():
    assert normalize_answer("The cat, and a dog!") == "cat dog"
    assert f1_score("painting sunsets", "Painted a sunset") == 1.0  # Porter: paint, sunset
    assert f1_score("on 7 May 2023", "7 May 2023") == pytest.approx(2 * 0.75 * 1 / 1.75)
    assert f1_score("", "x") == 0.0


def test_category_rules():
    # category 1: mean over comma-split gold parts of the best F1 against prediction parts
    assert f1_multi("Psychology", "Psychology, counseling certification") == pytest.approx(0.5)
    assert score_answer(1, "counseling certification, psychology", "Psychology, counseling certification") == 1.0
    # category 3: gold cut at the first ';'
    assert score_answer(3, "Likely yes", "Likely yes; she loves it") == 1.0
    assert score_answer(3, "she loves it", "Likely yes; she loves it") == 0.0
    # category 5: correct when the answer says the information is not there
    assert score_answer(5, "Not mentioned in the conversation", "") == 1.0
    assert score_answer(5, "There is no information available.", "") == 1.0
    assert score_answer(5, "self-care is important", "") == 0.0
    assert score_answer(2, "2022", 2022) == 1.0  # non-string gold answers
    with pytest.raises(ValueError):
        score_answer(7, "x", "y")


def test_adversarial_questions_are_two_option_and_resolved():
    qa = {"question": "What did she realize?", "category": 5, "adversarial_answer": "self-care matters"}
    text, key = question_text(qa, random.Random(0))
    assert "Select the correct answer: (a)" in text and set(key.values()) == {NOT_MENTIONED, "self-care matters"}
    letter = next(k for k, v in key.items() if v == NOT_MENTIONED)
    assert resolve_option(f"({letter})", key) == NOT_MENTIONED
    assert resolve_option(letter, key) == NOT_MENTIONED
    assert resolve_option("something else", key) == "something else"
    temporal, none = question_text({"question": "When?", "category": 2}, random.Random(0))
    assert "Use DATE of CONVERSATION" in temporal and none is None


def test_summary_per_category_and_overall():
    recs = [{"category": 4, "score": 1.0}, {"category": 4, "score": 0.0}, {"category": 1, "score": 0.5}]
    s = summarize(recs)
    assert s["overall"] == pytest.approx(0.5) and s["n"] == 3
    assert s["by_category"]["4"] == {"name": "single-hop", "f1": 0.5, "n": 2}


def test_load_real_locomo_file():
    convs = load_locomo(eval_data_dir() / "locomo" / "locomo5-dev.json")
    assert len(convs) == 5
    c = convs[0]
    assert [s.number for s in c.sessions] == list(range(1, 20))  # numeric order: 10 after 9
    assert c.sessions[0].date == "1:56 pm on 8 May, 2023"
    assert c.sessions[0].text().startswith("DATE: 1:56 pm on 8 May, 2023\nCONVERSATION:\nCaroline said,")
    assert len(c.qa) == 199
    small = limit_sessions(c, 2)
    assert len(small.sessions) == 2 and 0 < len(small.qa) < len(c.qa)
    assert all(e.startswith(("D1:", "D2:")) for q in small.qa for e in q["evidence"])
    picked = pick_question_indices(len(c.qa), 10)
    assert len(picked) == 10 and picked[0] == 0 and len({c.qa[i]["category"] for i in picked}) >= 3
    assert pick_question_indices(3, None) == pick_question_indices(3, 5) == [0, 1, 2]


def test_turn_retrieval_pastes_matching_turns_in_order():
    turns = [PastTurn(i, f'Bob said, "filler line {i} about nothing much."', "1 May", "s1") for i in range(30)]
    turns[7] = PastTurn(7, 'Ann said, "My sister adopted a greyhound named Comet."', "1 May", "s1")
    turns[21] = PastTurn(21, 'Ann said, "Comet the greyhound loves the beach."', "9 June", "s2")
    r = TurnRetriever(turns, method="bm25")
    assert {t.order for t in r.search("greyhound Comet", 2)} == {7, 21}
    ctx = r.context("What is the greyhound called?", lambda s: len(s.split()), budget=40)
    assert ctx.splitlines() == ["DATE: 1 May", turns[7].text, "DATE: 9 June", turns[21].text]
    assert format_turns([]) == ""
    enc = lambda s: s.split()  # noqa: E731
    assert last_tokens("a b c d", enc, " ".join, 2) == "c d"
    assert last_tokens("a b", enc, " ".join, 5) == "a b"


def small_conversation():
    from memllm.evals.conversations import LocomoConversation, LocomoSession

    turns = [{"speaker": "Ann" if i % 2 else "Bob", "text": f"Turn {i}: I visited town number {i}."} for i in range(24)]
    return LocomoConversation(
        "tiny",
        [LocomoSession(1, "1 May 2023", turns[:12]), LocomoSession(2, "2 May 2023", turns[12:])],
        [
            {"question": "Which town did Bob visit first?", "answer": "town 0", "category": 4, "evidence": ["D1:1"]},
            {"question": "What did Ann bake?", "adversarial_answer": "bread", "category": 5, "evidence": ["D2:3"]},
        ],
    )


def small_eval(tiny_chat, **overrides):
    from chat_helpers import SMALL_MEMORY

    from memllm.engine import Engine
    from memllm.evals.conversations import ConversationEval, RunConfig

    engine = Engine(tiny_chat, SMALL_MEMORY)
    config = RunConfig(max_answer_tokens=3, retrieval_budget=64, truncation_tokens=64, **overrides)
    return engine, ConversationEval(engine, config, log=lambda _: None, progress=False)


async def test_every_mode_answers_every_question_of_a_small_conversation(tiny_chat):
    """The whole run, end to end, on a tiny random model: a history long enough to leave the
    window, every mode answering every question, scores summarised per category."""
    from memllm.evals.conversations import MODES

    conv = small_conversation()
    engine, evaluation = small_eval(tiny_chat)
    result = await evaluation.run([conv])
    assert engine.memory_settings.window < sum(len(engine.encode(s.text())) for s in conv.sessions)
    assert [set(r["predictions"]) for r in result["questions"]] == [set(MODES)] * 2
    assert [(r["sample_id"], r["index"]) for r in result["questions"]] == [("tiny", 0), ("tiny", 1)]
    for mode in MODES:
        summary = result["modes"][mode]
        assert summary["n"] == 2 and set(summary["by_category"]) == {"4", "5"}
        assert 0.0 <= summary["overall"] <= 1.0
    assert {"memory_read", "truncation_read"} <= set(result["timing_s"])


async def test_a_resumed_run_answers_only_the_rest_as_the_whole_run_does(tiny_chat):
    """An interrupted run (here: only the first question) resumed from its records answers only the
    questions left, saves after each, and gives the records a whole run gives."""
    conv = small_conversation()
    _, first = small_eval(tiny_chat, limit_questions=1)
    partial = (await first.run([conv]))["questions"]
    assert [r["index"] for r in partial] == [0]

    saved: list[list[int]] = []
    _, rest = small_eval(tiny_chat)
    resumed = await rest.run([conv], done=partial, on_record=lambda recs, _t: saved.append([r["index"] for r in recs]))
    assert saved == [[0, 1]], "the first question was answered again, or the second not saved"
    assert resumed["questions"][0] is partial[0]

    _, whole = small_eval(tiny_chat)
    everything = (await whole.run([conv]))["questions"]
    strip = lambda recs: [{k: r[k] for k in ("index", "predictions", "scores")} for r in recs]  # noqa: E731
    assert strip(resumed["questions"]) == strip(everything)

    saved.clear()
    again = await rest.run([conv], done=everything, on_record=lambda recs, _t: saved.append(recs))
    assert saved == [] and again["modes"]["memory"]["n"] == 2, "a finished run must not read anything again"


def _result(sample_id: str, scores: list[float], **settings) -> dict:
    records = [
        {"sample_id": sample_id, "index": i, "category": 4, "scores": {"memory": s}, "predictions": {"memory": "x"}}
        for i, s in enumerate(scores)
    ]
    base = {"data_sha256": "ab12", "model": "m", "memory": {"top_k": 32}, "retrieval": "mean", "config": {}}
    return base | settings | result_payload(records, ["memory"], {"memory_questions": 1.0})


def test_merge_recomputes_the_summaries_and_refuses_overlaps_and_other_settings():
    merged = merge_results([_result("a", [1.0, 0.0]), _result("b", [0.5])])
    assert merged["modes"]["memory"]["n"] == 3 and merged["modes"]["memory"]["overall"] == pytest.approx(0.5)
    assert merged["config"]["conversations"] == ["a", "b"] and merged["timing_s"] == {"memory_questions": 2.0}
    with pytest.raises(ValueError, match="question 0 of a is in more than one run"):
        merge_results([_result("a", [1.0]), _result("a", [0.0])])
    with pytest.raises(ValueError, match="differ in memory"):
        merge_results([_result("a", [1.0]), _result("b", [0.0], memory={"top_k": 8})])
    assert settings_mismatch(_result("a", [1.0]), _result("b", [1.0], retrieval="heads")) == ["retrieval"]


def test_cli_resume_refuses_a_file_of_other_settings(tmp_path):
    from click.testing import CliRunner

    from memllm.evals.conversations import conversations_command

    runner = CliRunner()
    usage = runner.invoke(conversations_command, ["--data", str(tmp_path / "none.json"), "--resume"])
    assert usage.exit_code != 0
    data = tmp_path / "locomo.json"
    data.write_text("[]")
    no_json = runner.invoke(conversations_command, ["--data", str(data), "--resume"])
    assert no_json.exit_code == 2 and "--resume needs --json" in no_json.output


def test_resume_keeps_the_records_of_the_same_settings_and_refuses_others(tmp_path):
    import json

    import click

    from memllm.evals.conversations import _resumed

    earlier = _result("a", [1.0, 0.0]) | {"wall_s": 5.0}
    path = tmp_path / "run.json"
    assert _resumed(path, earlier, ["memory"]) == ([], {}, 0.0)  # no file yet: a fresh start
    path.write_text(json.dumps(earlier))
    same = {k: earlier[k] for k in ("data_sha256", "model", "memory", "retrieval", "config")}
    records, timing, wall = _resumed(path, same | {"data": "moved/elsewhere.json"}, ["memory"])
    assert [r["index"] for r in records] == [0, 1] and timing == {"memory_questions": 1.0} and wall == 5.0
    with pytest.raises(click.ClickException, match="other memory"):
        _resumed(path, earlier | {"memory": {"top_k": 8}}, ["memory"])
    with pytest.raises(click.ClickException, match="other data_sha256"):
        _resumed(path, earlier | {"data_sha256": "cd34"}, ["memory"])
    with pytest.raises(click.ClickException, match="other modes"):
        _resumed(path, earlier, ["memory", "hybrid"])
    path.write_text("{not json")
    with pytest.raises(click.ClickException, match="not a result of this command"):
        _resumed(path, earlier, ["memory"])


def test_select_conversations_by_sample_id():
    convs = [LocomoConversation(sid, []) for sid in ("conv-1", "conv-2", "conv-3")]
    assert select_conversations(convs, None) == convs
    assert [c.sample_id for c in select_conversations(convs, "conv-3, conv-1")] == ["conv-1", "conv-3"]
    with pytest.raises(ValueError, match="no conversation conv-9"):
        select_conversations(convs, "conv-1,conv-9")


def test_spread_order_is_a_permutation_whose_prefixes_cover_the_list():
    items = list(range(100, 199))
    order = spread_order(items)
    assert sorted(order) == items and order[:4] == [100, 164, 132, 196]
    for m in (4, 10, 33):
        gaps = [b - a for a, b in itertools.pairwise(sorted(order[:m]))]
        assert max(gaps) <= 2 * len(items) / m + 1, (m, gaps)
    assert spread_order([]) == [] and spread_order([7]) == [7]


def _paired_records() -> list[dict]:
    """Hybrid above truncation on every single-hop question, level with it on the temporal ones."""
    rows = [
        (4, {"memory": 0.5, "hybrid": 1.0, "truncation": 0.0}),
        (2, {"memory": 0.0, "hybrid": 0.5, "truncation": 0.5}),
    ]
    return [
        {"sample_id": "a", "index": i, "category": cat, "scores": scores, "predictions": {}}
        for i, (cat, scores) in enumerate(rows * 10)
    ]


def test_modes_are_compared_to_the_baseline_per_question_overall_and_per_category():
    from memllm.evals.conversations import compare_modes, format_comparison

    paired = compare_modes(_paired_records(), ["memory", "hybrid", "truncation"], "truncation")
    assert paired["baseline"] == "truncation" and list(paired["modes"]) == ["memory", "hybrid"]
    hybrid = paired["modes"]["hybrid"]
    assert list(hybrid) == ["overall", "2", "4"]
    assert hybrid["4"]["mean"] == pytest.approx(1.0) and hybrid["4"]["wins"] == 10
    assert hybrid["2"]["mean"] == 0.0 and (hybrid["2"]["wins"], hybrid["2"]["losses"]) == (0, 0)
    assert hybrid["overall"]["mean"] == pytest.approx(0.5) and hybrid["overall"]["n"] == 20
    assert paired["modes"]["memory"]["2"]["losses"] == 10
    text = format_comparison(paired)
    assert "hybrid  4 single-hop" in text and "+1.000 *" in text and "[-0.500, -0.500]" in text


def test_comparison_is_added_only_when_the_baseline_ran_and_merges_recompute_it(tmp_path):
    import json

    from click.testing import CliRunner

    from memllm.evals.conversations import conversations_merge_command, with_comparison

    records = _paired_records()
    result = {"data_sha256": "ab", "model": "m", "memory": {}, "retrieval": "mean", "config": {}}
    result |= result_payload(records, ["memory", "hybrid", "truncation"], {})
    assert "paired" in with_comparison(result, "truncation")
    assert "paired" not in with_comparison(with_comparison(result, "truncation"), "retrieval")
    assert "paired" not in with_comparison(result, None)

    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(
        json.dumps(with_comparison(result | result_payload(records[:6], list(result["modes"]), {}), "truncation"))
    )
    second.write_text(json.dumps(result | result_payload(records[6:], list(result["modes"]), {})))
    out = tmp_path / "all.json"
    ran = CliRunner().invoke(conversations_merge_command, [str(first), str(second), "--out", str(out)])
    assert ran.exit_code == 0, ran.output
    merged = json.loads(out.read_text())
    assert merged["paired"]["modes"]["hybrid"]["overall"]["n"] == 20, "the comparison covers the merged questions"
    alone = CliRunner().invoke(conversations_merge_command, [str(second), "--baseline", "memory"])
    assert alone.exit_code == 0 and "vs memory" in alone.output and "wrote" not in alone.output
    typo = CliRunner().invoke(conversations_merge_command, [str(second), "--baseline", "trunc"])
    assert typo.exit_code == 2 and "'trunc' is not one of" in typo.output


def test_results_can_be_published_without_the_data_text(tmp_path):
    import json

    from click.testing import CliRunner

    from memllm.evals.conversations import conversations_merge_command

    run = _result("a", [1.0, 0.0])
    for r in run["questions"]:
        r |= {"question": "Where did Caroline go?", "gold": "Paris"}
    path = tmp_path / "run.json"
    path.write_text(json.dumps(run))
    ran = CliRunner().invoke(conversations_merge_command, [str(path), "--out", str(path), "--without-text"])
    assert ran.exit_code == 0, ran.output
    kept = json.loads(path.read_text())
    assert [set(r) for r in kept["questions"]] == [{"sample_id", "index", "category", "scores", "predictions"}] * 2
    assert kept["modes"] == run["modes"] and merge_results([kept])["modes"] == run["modes"]

"""LoCoMo scoring (official protocol), data loading, and the text-retrieval baseline."""

from __future__ import annotations

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
    normalize_answer,
    pick_questions,
    question_text,
    resolve_option,
    score_answer,
    select_conversations,
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
    picked = pick_questions(c.qa, 10)
    assert len(picked) == 10 and picked[0] is c.qa[0] and len({q["category"] for q in picked}) >= 3


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


async def test_every_mode_answers_every_question_of_a_small_conversation(tiny_chat):
    """The whole run, end to end, on a tiny random model: a history long enough to leave the
    window, every mode answering every question, scores summarised per category."""
    from chat_helpers import SMALL_MEMORY

    from memllm.engine import Engine
    from memllm.evals.conversations import MODES, ConversationEval, LocomoConversation, LocomoSession, RunConfig

    turns = [{"speaker": "Ann" if i % 2 else "Bob", "text": f"Turn {i}: I visited town number {i}."} for i in range(24)]
    conv = LocomoConversation(
        "tiny",
        [LocomoSession(1, "1 May 2023", turns[:12]), LocomoSession(2, "2 May 2023", turns[12:])],
        [
            {"question": "Which town did Bob visit first?", "answer": "town 0", "category": 4, "evidence": ["D1:1"]},
            {"question": "What did Ann bake?", "adversarial_answer": "bread", "category": 5, "evidence": ["D2:3"]},
        ],
    )
    engine = Engine(tiny_chat, SMALL_MEMORY)
    config = RunConfig(max_answer_tokens=3, retrieval_budget=64, truncation_tokens=64)
    result = await ConversationEval(engine, config, log=lambda _: None, progress=False).run([conv])
    assert engine.memory_settings.window < sum(len(engine.encode(s.text())) for s in conv.sessions)
    assert [set(r["predictions"]) for r in result["questions"]] == [set(MODES)] * 2
    for mode in MODES:
        summary = result["modes"][mode]
        assert summary["n"] == 2 and set(summary["by_category"]) == {"4", "5"}
        assert 0.0 <= summary["overall"] <= 1.0
    assert {"memory_read", "truncation_read"} <= set(result["timing_s"])


def test_select_conversations_by_sample_id():
    convs = [LocomoConversation(sid, []) for sid in ("conv-1", "conv-2", "conv-3")]
    assert select_conversations(convs, None) == convs
    assert [c.sample_id for c in select_conversations(convs, "conv-3, conv-1")] == ["conv-1", "conv-3"]
    with pytest.raises(ValueError, match="no conversation conv-9"):
        select_conversations(convs, "conv-1,conv-9")

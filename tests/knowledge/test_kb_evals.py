"""Pieces of the evaluation commands: SciFact parsing, BEIR metrics, answer scoring."""

from __future__ import annotations

import math

import pytest

from memllm.evals.common import ndcg_at, recall_at, token_f1
from memllm.evals.longdoc import letter_of, score
from memllm.evals.retrieval import load_scifact, parse_sentence_list


def test_sentence_list_without_commas():
    field = "['First sentence.'\n 'It\\'s the \"second\" one.'\n \"Third, with 'quotes'.\"]"
    assert parse_sentence_list(field) == ["First sentence.", 'It\'s the "second" one.', "Third, with 'quotes'."]
    assert parse_sentence_list("plain text") == ["plain text"]


def test_load_scifact_format(tmp_path):
    (tmp_path / "corpus_train.csv").write_text(
        "doc_id,title,abstract,structured\n1,T one,\"['A b.'\n 'C d.']\",False\n2,T two,\"['E f.']\",False\n"
    )
    (tmp_path / "claims_train.csv").write_text(
        "id,claim,evidence_doc_id,evidence_label,evidence_sentences,cited_doc_ids\n"
        "7,Claim seven.,1,SUPPORT,[0],[1]\n7,Claim seven.,2,SUPPORT,[0],[1 2]\n"
        "8,No cites.,,,[],[]\n9,Unknown doc.,,,[],[99]\n"
    )
    data = load_scifact(tmp_path)
    assert data.doc_ids == ["1", "2"] and data.texts == ["T one A b. C d.", "T two E f."]
    assert data.queries == {"7": "Claim seven."} and data.qrels == {"7": {"1", "2"}}


def test_ndcg_and_recall():
    rel = {"a", "b"}
    assert ndcg_at(["a", "b", "c"], rel) == pytest.approx(1.0)
    expected = (1 / math.log2(3)) / (1 + 1 / math.log2(3))
    assert ndcg_at(["x", "a", "y"], rel) == pytest.approx(expected)
    assert ndcg_at(["x"] * 10 + ["a"], rel) == 0.0  # beyond the cut
    assert recall_at(["x", "a"], rel, 100) == 0.5


def test_answer_scoring():
    assert letter_of(" (B) because ...") == "B" and letter_of("The answer is C.") == "C" and letter_of("none") is None
    assert score("B", "(B) Their subconscious knew", mc=True) == 1.0
    assert score("(A)", "(B) x", mc=True) == 0.0
    assert token_f1("The Beatles played", "beatles playing") == pytest.approx(1.0)  # stemmed, articles dropped
    assert score("April 25, 2018", ["April 25 , 2018", "2018"], mc=False) == 1.0
    assert token_f1("ten", "10") == 0.0


async def test_longdoc_eval_constrains_multiple_choice_to_the_letters(tmp_path, kb_engine):
    """Every mode of a multiple-choice run answers with exactly one option letter (tiny random model)."""
    import json

    from kb_helpers import PARAGRAPHS

    from memllm.evals.longdoc import LETTERS, MODES, evaluate
    from memllm.settings import Settings

    options = "\n(A) green\n(B) black\n(C) blue\n(D) red"
    row = {
        "input": "\n\n".join(PARAGRAPHS * 3),
        "instructions": [f"In what ink were the ship names written?{options}", f"What froze?{options}"],
        "outputs": ["(A) green", "(C) blue"],
        "evaluation": "exam",
    }
    data = tmp_path / "mc.jsonl"
    data.write_text(json.dumps(row) + "\n")
    settings = Settings(data_dir=tmp_path / "data", memory=kb_engine.memory_settings)
    result = await evaluate(data, settings=settings, engine=kb_engine, context=256, log=lambda _: None)
    assert result["config"]["choice"] == "letters" and result["metric"] == "exact match"
    answers = [d[m]["answer"] for d in result["details"] for m in MODES]
    # the tiny model's WordPiece tokenizer is uncased: its letter tokens decode in lower case
    assert len(answers) == 2 * len(MODES) and all(a.upper() in LETTERS for a in answers), answers
    with pytest.raises(ValueError, match="unknown choice"):
        await evaluate(data, settings=settings, engine=kb_engine, choice="guess")

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


def _shard(docs: dict[int, list[float]], **config) -> dict:
    details = [
        {"document": d, "memory": {"score": s}, "truncation": {"score": 1 - s}} for d, ss in docs.items() for s in ss
    ]
    cfg = {"data": "nq.jsonl", "max_chars": None, "questions": None, "context": 8192, "choice": "letters", "memory": {}}
    return {
        "config": {**cfg, **config},
        "metric": "token F1",
        "modes": ["memory", "truncation"],
        "rows": [],
        "ingest": {"tokens": 100 * len(docs), "seconds": 2.0, "tokens_per_s": 50.0},
        "seconds": 10.0,
        "details": details,
    }


def test_longdoc_shards_merge_into_one_table_over_all_questions():
    from memllm.evals.longdoc import merge

    merged = merge([_shard({2: [1.0, 0.0, 0.0]}, offset=2), _shard({0: [1.0], 1: [0.0, 0.0]}, offset=0)])
    assert [d["document"] for d in merged["details"]] == [0, 1, 1, 2, 2, 2]
    assert merged["rows"] == [
        {"mode": "memory", "questions": 6, "token F1": pytest.approx(2 / 6)},
        {"mode": "truncation", "questions": 6, "token F1": pytest.approx(4 / 6)},
    ]
    assert merged["ingest"] == {"tokens": 300, "seconds": 4.0, "tokens_per_s": 75.0}
    with pytest.raises(ValueError, match="overlap in documents \\[1\\]"):
        merge([_shard({1: [1.0]}), _shard({1: [0.0], 3: [1.0]})])
    with pytest.raises(ValueError, match="differ in \\['context'\\]"):
        merge([_shard({0: [1.0]}), _shard({1: [0.0]}, context=4096)])


def test_leval_documents_after_an_offset(tmp_path):
    from memllm.evals.longdoc import load_leval

    data = tmp_path / "d.jsonl"
    data.write_text("".join(f'{{"input": "{"x" * n}"}}\n' for n in (5, 50, 6, 7, 8)))
    lengths = [len(r["input"]) for r in load_leval(data, limit=2, max_chars=10, offset=1)]
    assert lengths == [6, 7]  # the long document is filtered out before the offset counts
    assert load_leval(data, offset=9) == []


def test_longdoc_merge_command(tmp_path):
    import json

    from click.testing import CliRunner

    from memllm.evals.cli import eval_group

    a, b, out = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "all.json"
    a.write_text(json.dumps(_shard({0: [1.0, 1.0]})))
    b.write_text(json.dumps(_shard({1: [0.0, 1.0]})))
    res = CliRunner().invoke(eval_group, ["longdoc-merge", str(a), str(b), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "0.75" in res.output and json.loads(out.read_text())["rows"][0]["questions"] == 4
    res = CliRunner().invoke(eval_group, ["longdoc-merge", str(a), str(a), "--out", str(out)])
    assert res.exit_code == 1 and "cannot merge: the runs overlap in documents [0]" in res.output

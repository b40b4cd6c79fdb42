"""Constrained decoding on the tiny random model: the Constraint object, GenerateJob with a grammar
and logprobs, the grammars and the tool-call prompt format (memllm/constrain)."""

from __future__ import annotations

import dataclasses
import json

import jsonschema
import pytest
import torch

from memllm.constrain import (
    FREE_TEXT,
    Constraint,
    ConstraintViolation,
    FunctionSpec,
    GrammarError,
    check_grammar,
    grammar_tokenizer,
    json_grammar,
    json_value,
    parse_tool_calls,
    render_messages,
    tool_calls_grammar,
    tools_system_text,
)
from memllm.engine import Engine
from memllm.sampling import SamplingParams
from memllm.serving.jobs import GenerateJob, Token, run_job

CORPUS = [
    '{"name": "Ada", "age": 36, "tags": ["math", "code"]}',
    '{"city": "Paris", "unit": "celsius", "ok": true, "n": null}',
    "The quick brown fox jumps over the lazy dog. <tool_call> </tool_call> 0123456789",
] * 20
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 2},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}
WEATHER = FunctionSpec(
    "get_weather",
    "the weather",
    {
        "type": "object",
        "properties": {"city": {"$ref": "#/$defs/City"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
        "$defs": {"City": {"type": "string", "maxLength": 6}},
    },
)
NOOP = FunctionSpec("noop")


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE of 512 tokens (the tiny model's vocabulary), trained here on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def engine(tiny, tokenizer):
    return Engine(dataclasses.replace(tiny, tokenizer=tokenizer))


@pytest.fixture(scope="module")
def lltok(engine):
    return grammar_tokenizer(engine.tokenizer, engine.model.config.vocab_size, engine.stop_ids)


def decode(tokenizer, ids):
    return tokenizer.decode(ids)


def generate(engine, grammar, lltok, seed, max_tokens=200, logprobs=None, temperature=1.0):
    """One constrained generation on the tiny model: (job, its Token events)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    prompt = engine.encode("Reply in JSON: ")
    job = GenerateJob(params, engine.stop_ids, prompt, constraint=Constraint(grammar, lltok), logprobs=logprobs)
    events = list(run_job(engine, engine.new_state("full"), job, prompt))
    return job, [e for e in events if isinstance(e, Token)]


def test_mask_allows_only_grammar_tokens(tokenizer, lltok):
    c = Constraint(json_grammar(SCHEMA), lltok)
    allowed = torch.nonzero(c.mask(torch.zeros(512)).isfinite()).flatten().tolist()
    assert allowed and all(tokenizer.decode([t]).startswith("{") for t in allowed)
    assert not c.done and not c.accepting
    for t in tokenizer('{"name": "Al", "age": 3, "role": "user", "tags": []}')["input_ids"]:
        assert torch.isfinite(c.mask(torch.zeros(512))[t])
        c.advance(t)
    assert c.accepting and c.done  # nothing may follow a complete object
    assert c.mask(torch.zeros(512)).isfinite().nonzero().flatten().tolist() == sorted(c.eos_ids)


def test_mask_keeps_allowed_logits_and_drops_padding_rows(lltok):
    c = Constraint(json_grammar(), lltok)
    logits = torch.randn(520)  # 8 rows past the grammar's vocabulary
    masked = c.mask(logits)
    assert masked.shape == logits.shape and not torch.isfinite(masked[512:]).any()
    keep = torch.isfinite(masked)
    assert torch.equal(masked[keep], logits[keep]) and logits.isfinite().all()  # a copy: the input is untouched


def test_a_forbidden_token_raises(tokenizer, lltok):
    c = Constraint(json_grammar(), lltok)
    with pytest.raises(ConstraintViolation):
        c.advance(tokenizer("x")["input_ids"][0])


def test_bad_schemas_are_grammar_errors(lltok):
    with pytest.raises(GrammarError, match="objectx"):
        check_grammar(json_grammar({"type": "objectx"}), lltok)
    with pytest.raises(GrammarError):
        Constraint(json_grammar({"type": "string", "pattern": "(?=a)"}), lltok)


@pytest.mark.parametrize("seed", range(12))
def test_sampled_json_follows_the_schema(engine, lltok, seed):
    job, tokens = generate(engine, json_grammar(SCHEMA), lltok, seed)
    assert job.finish_reason == "stop"
    jsonschema.validate(json.loads(decode(engine.tokenizer, [t.id for t in tokens])), SCHEMA)


@pytest.mark.parametrize("seed", range(6))
def test_sampled_tool_calls_parse_and_follow_the_parameters(engine, lltok, seed):
    grammar = tool_calls_grammar([WEATHER, NOOP], max_calls=2)
    job, tokens = generate(engine, grammar, lltok, seed)
    assert job.finish_reason == "stop"
    calls = parse_tool_calls(decode(engine.tokenizer, [t.id for t in tokens]))
    assert calls and len(calls) <= 2
    for call in calls:
        params = {"get_weather": WEATHER.parameters, "noop": NOOP.parameters}[call.name]
        jsonschema.validate(json.loads(call.arguments), params)


@pytest.mark.parametrize("seed", range(6))
def test_auto_grammar_is_text_or_calls(engine, lltok, seed):
    grammar = tool_calls_grammar([WEATHER], text=FREE_TEXT)
    _, tokens = generate(engine, grammar, lltok, seed, max_tokens=40)
    text = decode(engine.tokenizer, [t.id for t in tokens])
    assert text and (not text.startswith("<") or text.startswith("<tool_call>"))


def test_json_text_branch(engine, lltok):
    grammar = tool_calls_grammar([NOOP], text=json_value(SCHEMA))
    for seed in range(3):
        _, tokens = generate(engine, grammar, lltok, seed)
        text = decode(engine.tokenizer, [t.id for t in tokens])
        if parse_tool_calls(text) is None:
            jsonschema.validate(json.loads(text), SCHEMA)


def test_logprobs_are_the_raw_model_distribution(engine, lltok):
    """Token logprobs: log-softmax of the logits the job was given (before temperature and mask)."""
    params = SamplingParams(max_tokens=6, temperature=0.7, seed=1)
    job = GenerateJob(params, (), constraint=Constraint(json_grammar(SCHEMA), lltok), logprobs=3)
    gen = torch.Generator().manual_seed(0)
    seen = []
    token = job.next_token(logits := torch.randn(512, generator=gen))
    while token is not None:
        seen.append((logits, token))
        token = job.next_token(logits := torch.randn(512, generator=gen))
    tokens = [e for e in job.take_events() if isinstance(e, Token)]
    assert len(tokens) == 6
    for (logits, token), event in zip(seen, tokens, strict=False):
        reference = torch.log_softmax(logits, -1)
        assert event.id == token and event.logprob == pytest.approx(float(reference[token]), abs=1e-6)
        top_ids = [i for i, _ in event.top_logprobs]
        assert top_ids == torch.topk(reference, 3).indices.tolist()
        values = [lp for _, lp in event.top_logprobs]
        assert values == sorted(values, reverse=True) and sum(torch.tensor(values).exp()) <= 1.0


def test_no_logprobs_unless_asked(engine, lltok):
    _, tokens = generate(engine, json_grammar(), lltok, 0, max_tokens=4)
    assert all(t.logprob is None and t.top_logprobs == () for t in tokens)


def test_a_grammar_stops_the_answer_even_with_ignore_eos(engine, lltok):
    params = SamplingParams(max_tokens=300, temperature=1.0, seed=3, ignore_eos=True)
    prompt = engine.encode("x")
    job = GenerateJob(params, engine.stop_ids, prompt, constraint=Constraint(json_grammar(SCHEMA), lltok))
    list(run_job(engine, engine.new_state("full"), job, prompt))
    assert job.finish_reason == "stop" and len(job.generated) < 300


def test_max_tokens_cuts_a_constrained_answer(engine, lltok):
    job, tokens = generate(engine, json_grammar(SCHEMA), lltok, 0, max_tokens=3)
    assert job.finish_reason == "length" and len(tokens) == 3


def test_tool_messages_render_for_any_template():
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "tool_calls": [("get_weather", '{"city": "Rome"}'), ("noop", "")]},
        {"role": "tool", "content": "21 C"},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "It is 21 C."},
    ]
    out = render_messages(messages)
    assert [m["role"] for m in out] == ["user", "assistant", "user", "assistant"]
    assert parse_tool_calls(out[1]["content"])[0].name == "get_weather"
    assert [c.arguments for c in parse_tool_calls(out[1]["content"])] == ['{"city": "Rome"}', "{}"]
    assert out[2]["content"] == "<tool_response>\n21 C\n</tool_response>\n<tool_response>\nok\n</tool_response>"
    text = tools_system_text([WEATHER], forced="get_weather")
    assert '"name": "get_weather"' in text and "<tool_call>" in text and text.endswith("get_weather now.")


def test_parse_tool_calls_refuses_other_text():
    assert parse_tool_calls("hello") is None
    assert parse_tool_calls('<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call> trailing') is None
    assert parse_tool_calls('<tool_call>\n{"name": "a", "arguments": {"x": 1}') is None


def test_tool_grammar_needs_functions():
    with pytest.raises(ValueError):
        tool_calls_grammar([])

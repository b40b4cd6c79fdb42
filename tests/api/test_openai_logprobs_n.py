"""Logprobs, n choices and the 400s of the new OpenAI fields, through the real openai client and a
real server with the real bundled model."""

from __future__ import annotations

import math

import httpx
import openai
import pytest
import torch
from server_process import ServerProcess

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("api-logprobs") / "data"
    env = {"MEMLLM_API_MAX_OUTPUT_TOKENS": "128", "MEMLLM_API_DEFAULT_MAX_TOKENS": "16"}
    with ServerProcess(data_dir, env) as proc:
        yield proc


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-on-loopback", max_retries=0, timeout=300)


def check_entry(entry, k):
    assert isinstance(entry.token, str) and entry.logprob <= 0 and bytes(entry.bytes).decode("utf-8", "replace")
    tops = [t.logprob for t in entry.top_logprobs]
    assert len(tops) == k and tops == sorted(tops, reverse=True)
    assert sum(math.exp(lp) for lp in tops) <= 1 + 1e-5
    if tops:
        assert entry.logprob <= tops[0] + 1e-6


def test_chat_logprobs_shape(client):
    r = client.chat.completions.create(
        model="m", messages=PROMPT, max_tokens=12, temperature=0, logprobs=True, top_logprobs=5
    )
    c = r.choices[0]
    content = c.logprobs.content
    assert len(content) == r.usage.completion_tokens
    for e in content:
        check_entry(e, 5)
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob)  # greedy: the most likely token
        assert e.token == e.top_logprobs[0].token
    assert "".join(e.token for e in content) == c.message.content
    plain = client.chat.completions.create(model="m", messages=PROMPT, max_tokens=12, temperature=0, logprobs=True)
    assert all(e.top_logprobs == [] for e in plain.choices[0].logprobs.content)
    assert client.chat.completions.create(model="m", messages=PROMPT, max_tokens=3).choices[0].logprobs is None


def test_sampled_logprobs_are_the_models_not_the_temperatures(client):
    r = client.chat.completions.create(
        model="m", messages=PROMPT, max_tokens=12, temperature=1.5, seed=4, logprobs=True, top_logprobs=20
    )
    for e in r.choices[0].logprobs.content:
        check_entry(e, 20)


def test_streamed_chat_logprobs_equal_the_whole_ones(client):
    args = dict(model="m", messages=PROMPT, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**args).choices[0].logprobs.content
    chunks = list(client.chat.completions.create(**args, stream=True))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [(e.token, round(e.logprob, 4)) for e in whole]


def test_completion_logprobs_match_the_model(client, real_model):
    """The server's logprobs are the model's: log-softmax of its logits, recomputed here in-process."""
    from memllm.engine import Engine

    prompt = "The capital of France is"
    r = client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    engine = Engine(real_model)
    ids = engine.encode(prompt)
    for i in range(4):
        logits = engine.logits_of(engine.new_state("full"), ids)[-1]
        reference = torch.log_softmax(logits.float(), -1)
        token = int(torch.argmax(reference))
        assert engine.tokenizer.decode([token]) == lp.tokens[i]
        assert lp.token_logprobs[i] == pytest.approx(float(reference[token]), abs=2e-3)
        top = list(lp.top_logprobs[i].values())
        assert top == sorted(top, reverse=True) and len(top) <= 3
        ids.append(token)


def test_streamed_completion_logprobs(client):
    chunks = list(
        client.completions.create(model="m", prompt="One, two,", max_tokens=6, temperature=0, logprobs=1, stream=True)
    )
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
    offsets = [o for c in chunks if c.choices and c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert "".join(tokens) == text and len(tokens) == 6
    assert offsets == [sum(len(t) for t in tokens[:i]) for i in range(6)]


def test_n_choices(client):
    r = client.chat.completions.create(
        model="m", messages=PROMPT, max_tokens=10, temperature=1, seed=11, n=4, logprobs=True
    )
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.usage.completion_tokens == sum(len(c.logprobs.content) for c in r.choices)
    again = client.chat.completions.create(
        model="m", messages=PROMPT, max_tokens=10, temperature=1, seed=11, n=4, logprobs=True
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]  # seeds: 11 + i


def test_n_choices_streamed(client):
    chunks = list(
        client.chat.completions.create(
            model="m", messages=PROMPT, max_tokens=10, temperature=1, n=4, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert len({c.id for c in chunks}) == 1
    texts = {i: "" for i in range(4)}
    finishes = {i: [] for i in range(4)}
    for c in chunks[:-1]:
        (choice,) = c.choices
        texts[choice.index] += choice.delta.content or ""
        if choice.finish_reason:
            finishes[choice.index].append(choice.finish_reason)
    assert all(len(f) == 1 for f in finishes.values()) and all(texts.values())
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 4


def test_n_text_completions(client):
    r = client.completions.create(model="m", prompt="Once upon a time", max_tokens=5, temperature=1, n=3)
    assert [c.index for c in r.choices] == [0, 1, 2] and r.usage.completion_tokens <= 15


@pytest.fixture(scope="module")
def session_id(server):
    r = httpx.post(f"{server.url}/api/sessions", json={"name": "refusals"})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def bad_request(call) -> dict:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    body = info.value.body
    assert info.value.status_code == 400 and body["type"] == "invalid_request_error" and body["message"]
    return body


@pytest.mark.parametrize(
    "extra",
    [
        {"n": 9},
        {"top_logprobs": 3},
        {"logprobs": True, "top_logprobs": 21},
        {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        {"tool_choice": "required"},
        {"tools": TOOLS * 2},
        {"tools": [{"type": "function", "function": {"name": "g", "parameters": {"type": "string"}}}]},
        {"tools": [{"type": "function", "function": {"name": "g", "parameters": {"type": "objectx"}}}]},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objectx"}}}},
        {"response_format": {"type": "json_schema"}},
        {"response_format": {"type": "xml"}},
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}},
    ],
)
def test_chat_400s(client, extra):
    bad_request(lambda: client.chat.completions.create(model="m", messages=PROMPT, max_tokens=4, extra_body=extra))


@pytest.mark.parametrize(
    "extra",
    [
        {"n": 2},
        {"logprobs": True},
        {"response_format": {"type": "json_object"}},
        {"tools": TOOLS},
    ],
)
def test_session_turns_refuse_what_they_cannot_do(client, session_id, extra):
    sid = session_id
    body = bad_request(
        lambda: client.chat.completions.create(
            model="m", messages=PROMPT, max_tokens=4, extra_body={"session_id": sid, **extra}
        )
    )
    assert body["param"] == next(iter(extra))


@pytest.mark.parametrize("extra", [{"logprobs": 21}, {"logprobs": 2, "echo": True}, {"n": 0}])
def test_completion_400s(client, extra):
    bad_request(lambda: client.completions.create(model="m", prompt="Hi", max_tokens=4, extra_body=extra))

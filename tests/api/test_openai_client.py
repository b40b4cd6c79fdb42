"""The real openai client against a real server process and the real bundled model."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PROMPT = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused-on-loopback", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def test_models_lists_the_bundled_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["smollm2-135m-instruct"]
    assert models[0].owned_by == "memllm"


def test_chat_completion_with_usage(client, model_id):
    r = client.chat.completions.create(model=model_id, messages=PROMPT, max_tokens=12, temperature=0)
    text = r.choices[0].message.content
    assert text and text.strip()
    assert r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 5
    assert 1 <= r.usage.completion_tokens <= 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streamed_chat_equals_the_non_streamed_answer(client, model_id):
    whole = client.chat.completions.create(model=model_id, messages=PROMPT, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=model_id,
            messages=PROMPT,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_stop_string_ends_the_answer(client, model_id):
    free = client.chat.completions.create(model=model_id, messages=PROMPT, max_tokens=24, temperature=0)
    text = free.choices[0].message.content
    cut = next((i for i, ch in enumerate(text) if i > 0 and ch in " ,."), None)
    assert cut is not None, text
    stop = text[cut]
    stopped = client.chat.completions.create(model=model_id, messages=PROMPT, max_tokens=24, temperature=0, stop=[stop])
    assert stopped.choices[0].message.content == text[:cut]
    assert stopped.choices[0].finish_reason == "stop"


def test_seeded_sampling_repeats(client, model_id):
    runs = [
        client.chat.completions.create(
            model=model_id, messages=PROMPT, max_tokens=10, temperature=0.9, top_p=0.9, seed=7
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_completions_streamed_and_not(client, model_id):
    whole = client.completions.create(model=model_id, prompt="The capital of France is", max_tokens=6, temperature=0)
    assert whole.object == "text_completion" and whole.choices[0].text
    pieces = list(
        client.completions.create(
            model=model_id, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True
        )
    )
    assert "".join(p.choices[0].text for p in pieces if p.choices) == whole.choices[0].text
    assert "Paris" in whole.choices[0].text


def test_ignore_eos_decodes_max_tokens(client, model_id):
    messages = [{"role": "user", "content": "Answer with one word: is water wet?"}]
    natural = client.chat.completions.create(model=model_id, messages=messages, max_tokens=48, temperature=0)
    assert natural.choices[0].finish_reason == "stop" and natural.usage.completion_tokens < 48
    forced = client.chat.completions.create(
        model=model_id, messages=messages, max_tokens=48, temperature=0, extra_body={"ignore_eos": True}
    )
    assert forced.choices[0].finish_reason == "length" and forced.usage.completion_tokens == 48


def test_logit_bias_forces_and_bans_tokens(client, model_id):
    from transformers import AutoTokenizer

    from memllm.loading import resolve_model_dir
    from memllm.settings import Settings
    from memllm.testing import test_data_dir

    tok = AutoTokenizer.from_pretrained(resolve_model_dir(Settings(data_dir=test_data_dir()))[1])
    prompt = "The capital of France is"
    free = client.completions.create(model=model_id, prompt=prompt, max_tokens=1, temperature=0).choices[0].text
    (free_id,) = tok.encode(free, add_special_tokens=False)
    (berlin_id,) = tok.encode(" Berlin", add_special_tokens=False)
    forced = client.completions.create(
        model=model_id, prompt=prompt, max_tokens=1, temperature=0, logit_bias={str(berlin_id): 100}
    )
    assert forced.choices[0].text == " Berlin"
    banned = client.completions.create(
        model=model_id, prompt=prompt, max_tokens=1, temperature=0, logit_bias={str(free_id): -100}
    )
    assert banned.choices[0].text not in ("", free)
    for bad in ({"99999999": 5}, {"abc": 5}, {str(free_id): 101}):
        with pytest.raises(openai.BadRequestError) as refused:
            client.completions.create(model=model_id, prompt=prompt, max_tokens=1, logit_bias=bad)
        assert refused.value.body["code"] == "logit_bias"


def test_embeddings_float_and_base64(client):
    texts = ["A cat sat on the mat.", "A kitten rested on the rug.", "Quarterly tax filing deadlines."]
    r = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts)  # the client asks for base64
    vecs = [d.embedding for d in r.data]
    assert [len(v) for v in vecs] == [384, 384, 384]
    floats = client.embeddings.create(model="all-MiniLM-L6-v2", input=texts, encoding_format="float")
    assert floats.data[0].embedding == pytest.approx(vecs[0], abs=1e-6)

    def cos(a, b):
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cos(vecs[0], vecs[1]) > cos(vecs[0], vecs[2]) + 0.2
    assert r.usage.prompt_tokens > 10


def test_session_second_turn_recalls_the_first(client, model_id, server):
    sid = httpx.post(f"{server.url}/api/sessions", json={"name": "recall"}).json()["id"]
    first = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "My name is Zorblax. Please remember it."}],
        max_tokens=16,
        temperature=0,
        extra_body={"session_id": sid},
    )
    assert first.choices[0].message.content
    second = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "What is my name?"}],  # only the new message
        max_tokens=16,
        temperature=0,
        extra_body={"session_id": sid},
    )
    assert "zorblax" in second.choices[0].message.content.lower()
    history = httpx.get(f"{server.url}/api/sessions/{sid}/messages").json()["data"]
    assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
    assert history[3]["content"] == second.choices[0].message.content


def test_knowledge_base_answers_carry_sources(client, model_id, server):
    kbs = httpx.get(f"{server.url}/api/kbs").json()["data"]
    demo = next(k for k in kbs if k["name"] == "demo")
    r = client.chat.completions.create(
        model=model_id,
        messages=[{"role": "user", "content": "How does memllm remember documents?"}],
        max_tokens=16,
        temperature=0,
        extra_body={"kb_ids": [demo["id"]]},
    )
    extra = r.choices[0].model_extra
    assert extra["sources"], "an answer from a knowledge base cites its passages"
    assert all(s["kb_id"] == demo["id"] and s["text"] for s in extra["sources"])
    assert extra["memory_trace"] and all(t["mass"] >= 0 for t in extra["memory_trace"])


def test_errors_have_openai_shape(client, model_id, server):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model=model_id, messages=[], max_tokens=4)
    assert "messages" in str(bad.value)
    with pytest.raises(openai.BadRequestError) as big:
        client.chat.completions.create(model=model_id, messages=PROMPT, max_tokens=10_000)
    assert big.value.body["code"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=model_id, messages=PROMPT, max_tokens=4, extra_body={"session_id": 987654})
    headers = {"content-type": "application/json"}
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", headers=headers)
    assert r.status_code == 400 and set(r.json()["error"]) >= {"message", "type", "code"}

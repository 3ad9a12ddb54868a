"""Every OpenAI request field against the real service: honoured (stop, logprobs, system messages, user...), or
refused with a 400 naming it, streamed or not; the model's card; a prompt past the context."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest
from openai import OpenAI
from ray import serve

from serve.app.client import chat_request, image_data_uri
from serve.engine.requests import GenerationRequest, SamplingParams
from serve.kosmos2.images import prepare_image
from serve.kosmos2.tasks import Task, build_prompt
from tests.helpers import LIMITS, encode, photo

pytestmark = pytest.mark.slow

IMAGE = encode(photo(200, 150, seed=21), "PNG")
QUESTION = "what is on the left?"


def post(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)


def question(**fields) -> dict:
    """The question, answered with exactly 30 tokens (the tiny model's end token comes early)."""
    return chat_request(IMAGE, task="vqa", text=QUESTION, max_tokens=30, ignore_eos=True, **fields)


def events(response: httpx.Response) -> list[dict]:
    lines = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.fixture(scope="module")
def reference(codec, hf_engine):
    """The question's answer from the reference engine in this process: text, tokens and log-probabilities."""
    prepared = prepare_image(IMAGE, LIMITS)
    prompt = build_prompt(Task.VQA, QUESTION)
    ids = codec.encode(prompt.text)
    request = GenerationRequest(prepared.pixels, ids, SamplingParams(30, ignore_eos=True, logprobs=3))
    result = hf_engine.generate([request])[0]
    answer = codec.answer(prompt, ids.tolist(), result.token_ids, prepared.width, prepared.height)
    return answer, result


REFUSED = {
    "frequency_penalty": 0.5,
    "presence_penalty": -1.0,
    "logit_bias": {"50": 5},
    "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "locate", "parameters": {}}}],
    "tool_choice": "auto",
    "functions": [{"name": "locate"}],
    "function_call": "auto",
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "a dog"},
    "store": True,
    "service_tier": "flex",
    "reasoning_effort": "low",
    "verbosity": "low",
    "web_search_options": {},
    "top_logprobs": 2,  # without logprobs: true
    "stop": ["a", "b", "c", "d", "e"],  # more than 4
    "best_of": 2,  # not an OpenAI chat field
    "top_k": 5,
}


@pytest.mark.parametrize("field", REFUSED)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_field_that_cannot_be_honoured_is_refused_by_name(service_url, field, stream):
    response = post(service_url, question(stream=stream, **{field: REFUSED[field]}))
    assert response.status_code == 400, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["param"] == field and field in error["message"] and error["type"] == "invalid_request_error"


def test_stream_options_without_a_stream_is_refused(service_url):
    response = post(service_url, {**question(), "stream_options": {"include_usage": True}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "stream_options"


NEUTRAL = {
    "frequency_penalty": 0,
    "presence_penalty": 0,
    "logit_bias": {},
    "response_format": {"type": "text"},
    "tools": [],
    "tool_choice": "none",
    "parallel_tool_calls": True,
    "modalities": ["text"],
    "store": False,
    "service_tier": "auto",
    "n": 1,
    "logprobs": False,
    "user": "user-1234",
    "safety_identifier": "hashed-id",
    "metadata": {"experiment": "a"},
    "prompt_cache_key": "k",
}


def test_neutral_values_and_identifiers_are_accepted(service_url):
    plain = post(service_url, question()).json()["choices"]
    for field, value in NEUTRAL.items():
        response = post(service_url, question(**{field: value}))
        assert response.status_code == 200, (field, response.text)
        assert response.json()["choices"] == plain, field


def test_system_and_developer_messages_are_accepted_and_change_nothing(service_url):
    plain = post(service_url, question()).json()["choices"]
    for role in ("system", "developer"):
        body = question()
        body["messages"].insert(0, {"role": role, "content": "You are a helpful assistant. Answer briefly."})
        response = post(service_url, body)
        assert response.status_code == 200, response.text
        assert response.json()["choices"] == plain


def test_stop_strings_cut_the_answer_streamed_or_not(service_url, service, reference):
    answer, result = reference
    stop = answer.text[4:7]
    cut = answer.text.find(stop)
    assert cut >= 0 and len(answer.text) > cut + 3
    plain = post(service_url, question(stop=[stop, "never-there"])).json()
    choice = plain["choices"][0]
    assert (choice["message"]["content"], choice["finish_reason"]) == (answer.text[:cut], "stop")
    assert all(entity["span"][1] <= cut for entity in choice["message"]["entities"])
    assert plain["usage"]["completion_tokens"] < result.completion_tokens  # generation ended early
    chunks = events(post(service_url, question(stop=stop, stream=True)))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == answer.text[:cut]
    final = [c for c in chunks if c["choices"] and c["choices"][0].get("finish_reason")]
    assert final[0]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"] == plain["usage"]
    generator = serve.get_deployment_handle("Generator", app_name="kosmos2")
    for _ in range(100):  # the cancelled generations leave the engine
        if generator.stats.remote().result()["running"] == 0:
            break
        time.sleep(0.1)
    assert generator.stats.remote().result()["running"] == 0


def test_logprobs_in_openais_shape_from_the_engine(service_url, service, reference):
    answer, result = reference
    client = OpenAI(base_url=f"{service_url}/v1", api_key="unused", max_retries=0)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_uri(IMAGE)}},
                {"type": "text", "text": QUESTION},
            ],
        }
    ]
    options = {
        "model": service.served_model_name,
        "messages": messages,
        "max_tokens": 30,
        "extra_body": {"ignore_eos": True},
    }
    response = client.chat.completions.create(**options, logprobs=True, top_logprobs=3)
    choice = response.choices[0]
    content = choice.logprobs.content
    assert choice.message.content == answer.text
    assert "".join(entry.token for entry in content) == answer.text  # a question: every word is generated
    assert len(content) == len(result.token_ids)
    for entry in content:
        assert bytes(entry.bytes) == entry.token.encode() and len(entry.top_logprobs) == 3
    np.testing.assert_allclose([e.logprob for e in content], result.logprobs.chosen, atol=1e-4)
    for entry, values in zip(content, result.logprobs.top_logprobs):
        np.testing.assert_allclose([t.logprob for t in entry.top_logprobs], values, atol=1e-4)
    stream = client.chat.completions.create(**options, logprobs=True, top_logprobs=3, stream=True)
    streamed = [
        entry
        for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content
    ]
    assert [e.model_dump() for e in streamed] == [e.model_dump() for e in content]
    plain = client.chat.completions.create(**options)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == answer.text


def test_the_models_card(service_url, service):
    card = httpx.get(f"{service_url}/v1/models/{service.served_model_name}").json()
    assert (card["id"], card["object"]) == (service.served_model_name, "model")
    missing = httpx.get(f"{service_url}/v1/models/gpt-4o")
    assert missing.status_code == 404
    assert (missing.json()["error"]["code"], missing.json()["error"]["param"]) == ("model_not_found", "model")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"text": "why " * 300}, "messages"),  # the prompt alone is past the 256 tokens of a sequence
        ({"text": "why " * 2000}, "messages"),  # past what is read at all
        ({"max_tokens": 100_000}, "max_tokens"),  # the prompt fits, the answer asked for does not
    ],
    ids=["prompt", "text", "max_tokens"],
)
def test_a_prompt_past_the_context(service_url, fields, param):
    body = chat_request(IMAGE, task="vqa", **{"text": QUESTION, **fields})
    for stream in (False, True):
        response = post(service_url, {**body, "stream": stream})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("context_length_exceeded", param)
        assert "maximum context length" in error["message"] or "context" in error["message"]

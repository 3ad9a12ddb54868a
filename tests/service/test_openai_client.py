"""The official ``openai`` client against the running service: completions, entities, streaming, errors."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI

from serve.app.client import image_data_uri
from tests.helpers import encode, photo

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(service_url):
    return OpenAI(base_url=f"{service_url}/v1", api_key="unused", max_retries=0)


def image_part(seed: int = 0) -> dict:
    return {"type": "image_url", "image_url": {"url": image_data_uri(encode(photo(seed=seed), "JPEG"))}}


def test_models_and_a_region_description(client, service):
    assert [m.id for m in client.models.list().data] == [service.served_model_name]
    response = client.chat.completions.create(
        model=service.served_model_name,
        messages=[{"role": "user", "content": [image_part()]}],
        max_tokens=8,
        extra_body={"task": "describe_region", "region": [0.0, 0.0, 0.5, 0.5]},
    )
    message = response.choices[0].message
    assert message.content.startswith("It is")
    assert message.entities[0]["phrase"] == "It"
    assert message.entities[0]["boxes"] == [[0.015625, 0.015625, 0.484375, 0.484375]]
    assert response.usage.prompt_tokens > 64 and response.choices[0].finish_reason in ("stop", "length")


def test_streaming_with_usage(client, service):
    messages = [{"role": "user", "content": [image_part(1), {"type": "text", "text": "What is this?"}]}]
    plain = client.chat.completions.create(model=service.served_model_name, messages=messages, max_tokens=12)
    stream = client.chat.completions.create(
        model=service.served_model_name,
        messages=messages,
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens
    finals = [c.choices[0] for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].delta.entities == plain.choices[0].message.entities


def test_errors_raise_the_sdk_exceptions(client, service):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": [image_part()]}])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=service.served_model_name, messages=[{"role": "user", "content": "no image here"}]
        )
    assert info.value.body["param"] == "messages"

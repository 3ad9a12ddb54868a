"""Hypothesis on the protocol models and the request-to-job step: any JSON either becomes a job or raises a
``ServiceError`` (or pydantic's ``ValidationError``), never anything else."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from serve.app.config import ServiceConfig
from serve.app.messages import job_from_request
from serve.app.protocol import ChatCompletionRequest
from serve.errors import ServiceError

CONFIG = ServiceConfig()

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("image_url"), "image_url": st.fixed_dictionaries({"url": st.text()})}),
    st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=50)}),
    json_values,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["user", "system", "assistant", "x"]),
            "content": st.one_of(st.text(), st.lists(parts)),
        }
    ),
    max_size=3,
)
bodies = st.fixed_dictionaries(
    {"messages": messages},
    optional={
        "model": st.one_of(st.none(), st.text(max_size=10), st.just(CONFIG.served_model_name)),
        "max_tokens": json_values,
        "temperature": st.one_of(st.floats(allow_nan=True), json_values),
        "top_p": st.floats(allow_nan=True),
        "seed": st.integers(),
        "n": st.integers(),
        "stream": st.booleans(),
        "task": st.one_of(st.sampled_from(["caption", "vqa", "ground", "describe_region", "raw"]), st.text()),
        "region": st.lists(st.floats(allow_nan=True), max_size=5),
        "no_repeat_ngram_size": st.integers(),
        "unknown_field": json_values,
    },
)


@settings(max_examples=400, deadline=None)
@given(bodies)
def test_any_body_becomes_a_job_or_a_clear_error(body):
    try:
        request = ChatCompletionRequest.model_validate(body)
    except ValidationError:
        return
    try:
        job = job_from_request(request, CONFIG, "id")
    except ServiceError as exc:
        assert exc.status in (400, 404, 413) and exc.message
        return
    assert job.query.params.max_new_tokens >= 1 and 0 <= job.query.params.temperature <= 2

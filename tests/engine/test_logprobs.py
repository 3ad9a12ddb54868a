"""Log-probabilities from both engines: the model's own (transformers' logits), the same in a batch and alone,
the fast engine's equal to the reference's, streamed as in the result, and only for the requests that ask."""

from __future__ import annotations

import asyncio
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from serve.engine.base import Engine
from serve.engine.config import EngineConfig
from serve.engine.fast.engine import FastEngine
from serve.engine.loop import EngineLoop
from serve.engine.requests import Generated, GenerationRequest, GenerationResult, SamplingParams, TokenLogprobs
from serve.errors import InvalidRequest
from serve.kosmos2.images import prepare_image
from serve.kosmos2.tasks import Task, build_prompt
from tests.helpers import LIMITS, QUESTIONS, Recorder, encode, photo, requests_for


def with_logprobs(request: GenerationRequest, count: int | None) -> GenerationRequest:
    return dataclasses.replace(request, params=dataclasses.replace(request.params, logprobs=count))


def assert_close(got: TokenLogprobs, expected: TokenLogprobs) -> None:
    assert len(got) == len(expected)
    np.testing.assert_allclose(got.chosen, expected.chosen, atol=2e-4)
    assert got.top_ids == expected.top_ids
    for row, other in zip(got.top_logprobs, expected.top_logprobs):
        np.testing.assert_allclose(row, other, atol=2e-4)


@pytest.fixture(scope="module")
def mixed(codec):
    """Greedy, sampled and n-gram-banning requests, every other one asking for a different number of alternatives."""
    params = [
        SamplingParams(max_new_tokens=12, logprobs=3),
        SamplingParams(max_new_tokens=10),
        SamplingParams(max_new_tokens=12, temperature=0.9, seed=3, logprobs=5),
        SamplingParams(max_new_tokens=9, no_repeat_ngram_size=2),
        SamplingParams(max_new_tokens=14, no_repeat_ngram_size=2, logprobs=0),
        SamplingParams(max_new_tokens=8, logprobs=20),
    ]
    return requests_for(codec, params)


@pytest.fixture(scope="module")
def alone(hf_engine, mixed):
    return [hf_engine.generate([r])[0] for r in mixed]


def test_the_reference_reports_the_models_log_softmax(loaded, hf_engine, codec):
    """Against transformers' own ``generate`` with its raw logits, for requests alone (where it is right)."""
    for i, question in enumerate(QUESTIONS[:3]):
        image = Image.fromarray(prepare_image(encode(photo(seed=i)), LIMITS).pixels)
        prompt = build_prompt(Task.VQA, question)
        inputs = loaded.processor(text=prompt.text, images=image, return_tensors="pt")
        out = loaded.model.generate(
            **inputs, max_new_tokens=10, do_sample=False, output_logits=True, return_dict_in_generate=True
        )
        request = GenerationRequest(np.asarray(image), codec.encode(prompt.text), SamplingParams(10, logprobs=4))
        (result,) = hf_engine.generate([request])
        steps = [torch.log_softmax(step[0].float(), dim=-1) for step in out.logits][: len(result.token_ids)]
        values, ids = zip(*(step.topk(4) for step in steps))
        expected = TokenLogprobs(
            [step[token].item() for step, token in zip(steps, result.token_ids)],
            [row.tolist() for row in ids],
            [row.tolist() for row in values],
        )
        assert_close(result.logprobs, expected)
        assert result.logprobs.top_ids[0][0] == result.token_ids[0]  # greedy: the chosen token is the likeliest


def test_only_the_requests_that_ask_get_them(alone, mixed):
    for request, result in zip(mixed, alone):
        count = request.params.logprobs
        if count is None:
            assert result.logprobs is None
            continue
        assert len(result.logprobs) == len(result.token_ids)
        assert all(
            len(row) == count == len(values)
            for row, values in zip(result.logprobs.top_ids, result.logprobs.top_logprobs)
        )
        assert all(value <= 0 for value in result.logprobs.chosen)
        for values in result.logprobs.top_logprobs:
            assert values == sorted(values, reverse=True)


def test_asking_changes_no_token(hf_engine, mixed, alone):
    plain = [with_logprobs(r, None) for r in mixed]
    assert [r.token_ids for r in hf_engine.generate(plain)] == [r.token_ids for r in alone]


def test_a_batch_gives_what_requests_alone_give(hf_engine, mixed, alone):
    for got, expected in zip(hf_engine.generate(mixed), alone):
        assert got.token_ids == expected.token_ids
        if expected.logprobs is not None:
            assert_close(got.logprobs, expected.logprobs)


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_the_fast_engine_equals_the_reference(loaded, mixed, alone, overlap):
    """Three slots for six requests: admissions, decode steps and slots reused all carry them."""
    engine = FastEngine(loaded, EngineConfig(kind="fast", max_batch_size=3, max_seq_len=160, overlap=overlap))
    sinks = [Recorder() for _ in mixed]
    for request, sink in zip(mixed, sinks):
        engine.submit(request, sink)
    while engine.has_work:
        engine.step()
    for sink, expected in zip(sinks, alone):
        assert sink.result.token_ids == expected.token_ids == sink.seen
        if expected.logprobs is None:
            assert sink.result.logprobs is None and len(sink.logprobs) == 0
        else:
            assert_close(sink.result.logprobs, expected.logprobs)
            assert sink.logprobs == sink.result.logprobs  # streamed as in the result
    assert not engine.scheduler.logprob_counts


def test_the_fast_engine_computes_none_for_requests_that_do_not_ask(loaded, mixed, monkeypatch):
    calls = []
    import serve.engine.fast.engine as fast_module

    original = fast_module.token_logprobs
    monkeypatch.setattr(fast_module, "token_logprobs", lambda *a: calls.append(len(a[0])) or original(*a))
    engine = FastEngine(loaded, EngineConfig(kind="fast", max_batch_size=6, max_seq_len=160))
    engine.generate([with_logprobs(r, None) for r in mixed])
    assert calls == []
    engine.generate(mixed[:2])
    assert calls and set(calls) == {1}  # the one row that asked, at each step


def test_streams_carry_them_through_the_loop(loaded, mixed, alone):
    loop = EngineLoop(FastEngine(loaded, EngineConfig(kind="fast", max_batch_size=4, max_seq_len=160)))

    async def main():
        return [item async for item in loop.stream(mixed[2])]

    try:
        items = asyncio.run(main())
    finally:
        loop.stop()
    *pieces, result = items
    assert all(isinstance(piece, Generated) for piece in pieces) and isinstance(result, GenerationResult)
    streamed = TokenLogprobs()
    for piece in pieces:
        streamed.extend(piece.logprobs)
    assert [t for piece in pieces for t in piece.token_ids] == result.token_ids == alone[2].token_ids
    assert streamed == result.logprobs
    assert_close(result.logprobs, alone[2].logprobs)


def test_an_engine_without_them_refuses_requests_that_ask(loaded, mixed):
    class Plain(Engine):
        def step(self) -> float | None:
            return None

    engine = Plain(loaded, EngineConfig(kind="hf", max_seq_len=160))
    engine.submit(with_logprobs(mixed[0], None), Recorder())
    with pytest.raises(InvalidRequest) as info:
        engine.submit(mixed[0], Recorder())
    assert info.value.param == "logprobs"


def test_the_count_is_bounded():
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=21)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingParams(logprobs=-1)

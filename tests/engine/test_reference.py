"""The reference engine on the tiny model: batches give exactly what their requests give alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from serve.engine.reference import normalize_pixels
from serve.engine.requests import GenerationRequest, SamplingParams
from serve.kosmos2.images import prepare_image
from serve.kosmos2.tasks import Task, build_prompt
from tests.helpers import LIMITS, QUESTIONS, Recorder, encode, photo


def make_requests(codec, params: list[SamplingParams]) -> list[GenerationRequest]:
    requests = []
    for i, p in enumerate(params):
        question = QUESTIONS[i % len(QUESTIONS)]
        task = Task.CAPTION if i % 3 == 2 else Task.VQA
        prompt = build_prompt(task, None if task is Task.CAPTION else question)
        pixels = prepare_image(encode(photo(200 + 10 * i, 150, seed=i)), LIMITS).pixels
        requests.append(GenerationRequest(pixels, codec.encode(prompt.text), p))
    return requests


@pytest.fixture(scope="module")
def greedy_requests(codec):
    return make_requests(codec, [SamplingParams(max_new_tokens=24)] * 8)


@pytest.fixture(scope="module")
def alone(hf_engine, greedy_requests):
    return [hf_engine.generate([r])[0] for r in greedy_requests]


def test_the_workload_is_varied(greedy_requests, alone):
    """Guards the tests below: prompt lengths differ, and answers differ and end in both ways."""
    assert len({len(r.prompt_ids) for r in greedy_requests}) >= 5
    assert len({tuple(a.token_ids) for a in alone}) >= 5
    assert {a.finish_reason for a in alone} == {"stop", "length"}


@pytest.mark.parametrize("size", range(1, 9))
def test_batches_equal_requests_alone(hf_engine, greedy_requests, alone, size):
    for start in range(0, 8, size):
        batch = greedy_requests[start : start + size]
        assert hf_engine.generate(batch) == alone[start : start + size]


def test_alone_equals_transformers_generate(loaded, hf_engine, codec):
    """One request at a time, where transformers is right, our loop reproduces ``generate`` exactly."""
    for i, question in enumerate(QUESTIONS[:4]):
        image = Image.fromarray(prepare_image(encode(photo(seed=i)), LIMITS).pixels)
        prompt = build_prompt(Task.VQA, question)
        for ngram in (0, 3):
            inputs = loaded.processor(text=prompt.text, images=image, return_tensors="pt")
            expected = loaded.model.generate(
                **inputs, max_new_tokens=20, do_sample=False, no_repeat_ngram_size=ngram or None
            )[0, inputs["input_ids"].shape[1] :].tolist()
            request = GenerationRequest(
                np.asarray(image), codec.encode(prompt.text), SamplingParams(20, no_repeat_ngram_size=ngram)
            )
            result = hf_engine.generate([request])[0]
            assert result.token_ids + [2] * (result.finish_reason == "stop") == expected


def test_transformers_left_padding_drifts(loaded, hf_engine, greedy_requests, alone):
    """The defect fixed here: transformers' own generate, given the same left-padded batch, drifts."""
    width = max(len(r.prompt_ids) for r in greedy_requests)
    ids = torch.ones((8, width), dtype=torch.long)
    attention = torch.zeros_like(ids)
    image_mask = torch.zeros_like(ids, dtype=torch.bool)
    for row, request in enumerate(greedy_requests):
        pad = width - len(request.prompt_ids)
        ids[row, pad:] = torch.tensor(request.prompt_ids)
        attention[row, pad:] = 1
        image_mask[row, pad + 2 : pad + 66] = True
    pixels = normalize_pixels(
        torch.from_numpy(np.stack([r.pixels for r in greedy_requests])), hf_engine.geometry, torch.float32
    )
    output = loaded.model.generate(
        pixel_values=pixels,
        input_ids=ids,
        attention_mask=attention,
        image_embeds_position_mask=image_mask,
        max_new_tokens=24,
        do_sample=False,
    )
    generated = [row[width : width + len(a.token_ids)].tolist() for row, a in zip(output, alone, strict=True)]
    unpadded = [len(r.prompt_ids) == width for r in greedy_requests]
    assert all(g == a.token_ids for g, a, full in zip(generated, alone, unpadded) if full)
    assert any(g != a.token_ids for g, a, full in zip(generated, alone, unpadded) if not full)


def test_mixed_parameters_in_one_batch(hf_engine, codec):
    params = [
        SamplingParams(max_new_tokens=5),
        SamplingParams(max_new_tokens=30, temperature=0.8, seed=1),
        SamplingParams(max_new_tokens=30, temperature=1.2, top_p=0.7, seed=2),
        SamplingParams(max_new_tokens=30, no_repeat_ngram_size=2),
        SamplingParams(max_new_tokens=1),
        SamplingParams(max_new_tokens=30, temperature=1.0, seed=1, no_repeat_ngram_size=3),
    ]
    requests = make_requests(codec, params)
    batch = hf_engine.generate(requests)
    assert batch == [hf_engine.generate([r])[0] for r in requests]
    assert hf_engine.generate(requests) == batch  # seeded sampling repeats
    assert len(batch[0].token_ids) <= 5 and len(batch[4].token_ids) <= 1
    for result, request in zip(batch, requests, strict=True):
        assert result.prompt_tokens == len(request.prompt_ids)
        assert result.completion_tokens == len(result.token_ids) + (result.finish_reason == "stop")
        if result.finish_reason == "length":
            assert len(result.token_ids) == request.params.max_new_tokens


def test_streaming_sinks_see_every_token(hf_engine, greedy_requests, alone):
    sinks = [Recorder() for _ in greedy_requests]
    for request, sink in zip(greedy_requests, sinks):
        hf_engine.submit(request, sink)
    while hf_engine.has_work:
        hf_engine.step()
    assert [s.seen for s in sinks] == [a.token_ids for a in alone]
    assert [s.result for s in sinks] == alone

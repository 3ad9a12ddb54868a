"""One request from image and task to answer: the processor's ids and pixels in, its post-processing out."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from serve.engine.requests import GenerationResult, SamplingParams
from serve.errors import ContextLengthExceeded, InvalidImage, InvalidRequest
from serve.kosmos2.images import PreparedImage
from serve.kosmos2.pipeline import Pipeline, Query
from serve.kosmos2.tasks import Task, build_prompt
from tests.helpers import LIMITS, encode, photo

SNOWMAN = (
    "<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> warming himself by"
    "<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>"
)


@pytest.fixture(scope="module")
def pipeline(loaded):
    return Pipeline(loaded.processor, LIMITS, max_seq_len=160)


def test_prepare_gives_the_processors_ids_and_pixels(pipeline, loaded):
    image = photo(640, 480)
    params = SamplingParams(max_new_tokens=9, no_repeat_ngram_size=3)
    prepared = pipeline.prepare(Query(Task.GROUND, "the red disc", params=params), encode(image))
    expected = loaded.processor(text="<grounding><phrase> the red disc</phrase>", images=image, return_tensors="np")
    assert prepared.request.prompt_ids.tolist() == expected["input_ids"][0].tolist()
    assert prepared.request.params == params and (prepared.width, prepared.height) == (640, 480)
    assert prepared.request.pixels.shape == (224, 224, 3) and prepared.request.pixels.dtype == np.uint8
    assert prepared.prompt.text == "<grounding><phrase> the red disc</phrase>" and prepared.prompt.echo


def test_finish_scales_boxes_to_the_original_image(pipeline, loaded):
    pixels = PreparedImage(np.zeros((224, 224, 3), dtype=np.uint8), 640, 480)
    prepared = pipeline.prepare(Query(Task.CAPTION), pixels)
    generated = loaded.processor.tokenizer(SNOWMAN, add_special_tokens=False)["input_ids"]
    answer = pipeline.finish(prepared, GenerationResult(generated, "stop", 71, len(generated) + 1))
    assert answer.text == "An image of a snowman warming himself by a fire"
    snowman = answer.entities[0]
    assert (snowman.phrase, snowman.span) == ("a snowman", (12, 21))
    assert snowman.boxes == [(0.390625, 0.046875, 0.984375, 0.828125)]
    assert snowman.boxes_px == [(250.0, 22.5, 630.0, 397.5)]

    decoding = pipeline.decoding(prepared)
    pieces = [decoding.opening().text] + [decoding.push([token]).text for token in generated]
    assert "".join(pieces) + decoding.finish(None).rest.text == answer.text


def test_text_is_checked_before_the_image_is_read(pipeline):
    with pytest.raises(InvalidRequest, match="maximum context length is 160 tokens"):
        pipeline.prepare(Query(Task.CAPTION, params=SamplingParams(max_new_tokens=100)), b"not an image")
    with pytest.raises(InvalidRequest, match="takes no text"):
        pipeline.prepare(Query(Task.CAPTION, "a dog"), b"not an image")
    with pytest.raises(InvalidImage):
        pipeline.prepare(Query(Task.CAPTION), b"not an image")


def test_engine_round_trip_equals_the_reference_on_the_same_request(pipeline, hf_engine, codec):
    prepared = pipeline.prepare(
        Query(Task.VQA, "What is it?", params=SamplingParams(max_new_tokens=6)), encode(photo())
    )
    (result,) = hf_engine.generate([prepared.request])
    answer = pipeline.finish(prepared, result)
    assert answer == codec.answer(prepared.prompt, prepared.request.prompt_ids.tolist(), result.token_ids, 320, 240)


def test_a_default_token_limit_shrinks_to_the_room_a_long_prompt_leaves(pipeline):
    image = PreparedImage(np.zeros((224, 224, 3), dtype=np.uint8), 64, 64)
    question = "is the small red circle on the left of the big blue square near the tall green tree " * 2
    asked = Query(Task.VQA, question, params=SamplingParams(max_new_tokens=64))
    ids = pipeline.codec.encode(build_prompt(Task.VQA, question).text)
    assert 160 - 64 < len(ids) < 160  # the prompt fits, with the 64 tokens it does not
    with pytest.raises(ContextLengthExceeded) as info:
        pipeline.prepare(asked, image)
    assert info.value.param == "max_tokens"
    defaulted = pipeline.prepare(replace(asked, fit_to_context=True), image)
    assert defaulted.request.params.max_new_tokens == 160 - len(ids)
    with pytest.raises(ContextLengthExceeded) as info:  # a prompt past the sequence is refused all the same
        pipeline.prepare(Query(Task.VQA, question * 3, fit_to_context=True), image)
    assert info.value.param == "messages"

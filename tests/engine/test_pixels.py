"""The pixel engine: its answers in Kosmos-2's tokens, read back by the same pipeline as the model's, box the
pixels that differ from the top-left one, for every task, with the parameters that apply."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from serve.engine.build import build_engine, load_for_engine
from serve.engine.config import EngineConfig, ModelConfig
from serve.engine.pixels import PixelEngine, colour_name, every_stretch, patch_indices, read_scene
from serve.engine.requests import SamplingParams
from serve.kosmos2.grounding import box_to_patch_indices
from serve.kosmos2.pipeline import Pipeline, Query
from serve.kosmos2.tasks import Task
from serve.kosmos2.text import AnswerStream
from tests.helpers import LIMITS, Recorder, encode, iou, shape_image

DISC = encode(shape_image(320, 240, (40, 30, 130, 120)))
"""A red disc (an ellipse 90 pixels wide) at the top left of a white 320x240 picture."""

DISC_BOX = (40, 30, 130, 120)
GOLDEN_PX = (45.0, 33.75, 125.0, 116.25)
"""The disc's box as the engine writes it (patch indices 132 and 492), in the original image's pixels."""

PLAIN = encode(Image.new("RGB", (50, 60), "white"))


@pytest.fixture(scope="module")
def engine(tiny_dir) -> PixelEngine:
    config = EngineConfig(kind="pixels", max_batch_size=16)
    engine = build_engine(load_for_engine(ModelConfig(source=str(tiny_dir)), config), config)
    assert isinstance(engine, PixelEngine)
    return engine


@pytest.fixture(scope="module")
def pipeline(engine) -> Pipeline:
    return Pipeline(engine.loaded.processor, LIMITS)


def ask(engine, pipeline, query: Query, image: bytes = DISC):
    prepared = pipeline.prepare(query, image)
    (result,) = engine.generate([prepared.request])
    return pipeline.finish(prepared, result), result


def test_the_engine_loads_no_weights(engine):
    assert {p.device.type for p in engine.loaded.model.parameters()} == {"meta"}
    assert engine.loaded.device.type == "cpu"


def test_patch_indices_are_kosmos2s_of_the_pixels_box():
    side = 224
    for first in range(side):
        for last in range(first, side, 3):
            box = (first / side, first / side, (last + 1) / side, (last + 1) / side)
            assert patch_indices(first, first, last, last) == box_to_patch_indices(box), (first, last)


def test_a_caption_is_written_in_kosmos2_tokens(engine, pipeline):
    answer, result = ask(engine, pipeline, Query(Task.CAPTION))
    tokens = engine.tokenizer.convert_ids_to_tokens(result.token_ids)
    assert tokens == [
        "<phrase>",
        "▁a",
        "▁red",
        "▁shape",
        "</phrase>",
        "<object>",
        "<patch_index_0132>",
        "<patch_index_0492>",
        "</object>",
    ]
    assert (result.finish_reason, result.completion_tokens) == ("stop", 10)
    assert answer.text == "An image of a red shape"
    (entity,) = answer.entities
    assert (entity.phrase, entity.span, entity.boxes_px) == ("a red shape", (12, 23), [GOLDEN_PX])
    assert iou(entity.boxes_px[0], DISC_BOX) > 0.75


@pytest.mark.parametrize(
    ("query", "text", "phrase"),
    [
        (Query(Task.GROUND, "the red disc"), "the red disc", "the red disc"),
        (Query(Task.VQA, "What is this?"), "a red shape", "a red shape"),
        (
            Query(Task.DETAILED_CAPTION),
            "The image shows a red shape on a white background, at the top left.",
            "a red shape",
        ),
        (Query(Task.RAW, "<grounding> Look:"), "Look: a red shape", "a red shape"),
    ],
)
def test_every_task_boxes_the_shape(engine, pipeline, query, text, phrase):
    answer, _ = ask(engine, pipeline, query)
    assert answer.text == text
    assert [(e.phrase, e.boxes_px) for e in answer.entities] == [(phrase, [GOLDEN_PX])]


def test_a_region_is_described_by_what_it_holds(engine, pipeline):
    on_disc, _ = ask(engine, pipeline, Query(Task.DESCRIBE_REGION, region=(0.1, 0.1, 0.3, 0.4)))
    beside, _ = ask(engine, pipeline, Query(Task.DESCRIBE_REGION, region=(0.6, 0.6, 0.9, 0.9)))
    assert (on_disc.text, beside.text) == ("It is a red shape.", "It is the white background.")
    assert [e.phrase for e in on_disc.entities] == ["It"]


@pytest.mark.parametrize(
    ("query", "text"),
    [
        (Query(Task.CAPTION), "An image of nothing but a plain white background"),
        (Query(Task.DETAILED_CAPTION), "The image is plain white, with nothing on it."),
        (Query(Task.VQA, "What is this?"), "nothing: the image is plain white."),
        (Query(Task.GROUND, "the red disc"), "the red disc is not in the image: it is plain white."),
        (Query(Task.DESCRIBE_REGION, region=(0, 0, 1, 1)), "It is the white background."),
    ],
)
def test_a_plain_image_has_no_entity_and_the_answer_says_so(engine, pipeline, query, text):
    answer, result = ask(engine, pipeline, query, PLAIN)
    assert answer.text == text and result.finish_reason == "stop"
    assert [e.phrase for e in answer.entities] == (["It"] if query.task is Task.DESCRIBE_REGION else [])


def test_max_tokens_cuts_the_answer(engine, pipeline):
    _, whole = ask(engine, pipeline, Query(Task.CAPTION))
    for limit in (1, 5, 8):
        answer, result = ask(engine, pipeline, Query(Task.CAPTION, params=SamplingParams(max_new_tokens=limit)))
        assert result.token_ids == whole.token_ids[:limit]
        assert (result.finish_reason, result.completion_tokens) == ("length", limit)
        assert answer.entities == []  # a box cut short is no box
    for limit, reason in ((9, "length"), (10, "stop")):  # 9 tokens: the whole answer, without the end token
        answer, result = ask(engine, pipeline, Query(Task.CAPTION, params=SamplingParams(max_new_tokens=limit)))
        assert (result.finish_reason, result.token_ids, len(answer.entities)) == (reason, whole.token_ids, 1)


def test_ignore_eos_gives_exactly_max_tokens_and_the_same_answer(engine, pipeline):
    plain, whole = ask(engine, pipeline, Query(Task.CAPTION))
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    answer, result = ask(engine, pipeline, Query(Task.CAPTION, params=params))
    eos = engine.geometry.eos_id
    assert result.token_ids == whole.token_ids + [eos] * (40 - len(whole.token_ids))
    assert (result.finish_reason, result.completion_tokens) == ("length", 40)
    assert answer == plain


def test_sampling_parameters_do_not_change_the_answer(engine, pipeline):
    _, greedy = ask(engine, pipeline, Query(Task.VQA, "what?"))
    params = SamplingParams(temperature=1.5, top_p=0.5, seed=3, no_repeat_ngram_size=1)
    _, sampled = ask(engine, pipeline, Query(Task.VQA, "what?", params=params))
    assert sampled.token_ids == greedy.token_ids


def test_streamed_tokens_are_the_results_one_at_a_time(engine, pipeline):
    prepared = pipeline.prepare(Query(Task.DETAILED_CAPTION), DISC)
    sink = Recorder()
    engine.submit(prepared.request, sink)
    while engine.has_work:
        engine.step()
    assert sink.seen == sink.result.token_ids
    stream = AnswerStream(pipeline.codec, prepared.prompt, prepared.request.prompt_ids.tolist())
    pieces = [stream.push([token]) for token in sink.seen]
    answer = pipeline.finish(prepared, sink.result)
    assert "".join(pieces) + stream.finish(answer.text) == answer.text
    assert len([piece for piece in pieces if piece]) > 3


def test_each_request_of_a_batch_is_answered_from_its_own_pixels(engine, pipeline):
    boxes = [(20 + 30 * i, 10 + 20 * i, 120 + 30 * i, 90 + 20 * i) for i in range(8)]
    prepared = [pipeline.prepare(Query(Task.CAPTION), encode(shape_image(400, 300, box))) for box in boxes]
    results = engine.generate([p.request for p in prepared])
    for p, result, box in zip(prepared, results, boxes):
        (entity,) = pipeline.finish(p, result).entities
        assert iou(entity.boxes_px[0], box) > 0.6


def test_a_step_gathers_the_requests_that_arrive_within_batch_wait_s(tiny_dir, pipeline):
    config = EngineConfig(kind="pixels", max_batch_size=3, batch_wait_s=60)
    engine = build_engine(load_for_engine(ModelConfig(source=str(tiny_dir)), config), config)
    sinks = [Recorder() for _ in range(4)]
    request = pipeline.prepare(Query(Task.CAPTION), DISC).request
    for sink in sinks[:2]:
        engine.submit(request, sink)
    assert engine.step() > 59 and [s.result for s in sinks] == [None] * 4  # waiting for more
    for sink in sinks[2:]:
        engine.submit(request, sink)
    assert engine.step() is None  # a full batch goes at once
    assert [s.result is not None for s in sinks] == [True, True, True, False] and len(engine.waiting) == 1


def test_colours_are_named_in_the_images_channel_order(engine, pipeline):
    blue, _ = ask(engine, pipeline, Query(Task.CAPTION), encode(shape_image(320, 240, DISC_BOX, (20, 30, 230))))
    assert blue.text == "An image of a blue shape"
    dark = encode(shape_image(320, 240, DISC_BOX, (70, 70, 70), background=(250, 240, 60)))
    detailed, _ = ask(engine, pipeline, Query(Task.DETAILED_CAPTION), dark)
    assert detailed.text == "The image shows a gray shape on a yellow background, at the top left."
    assert [colour_name(np.array(rgb)) for rgb in [(0, 0, 0), (255, 255, 250), (240, 130, 30)]] == [
        "black",
        "white",
        "orange",
    ]


def test_the_scene_is_the_box_of_the_pixels_unlike_the_top_left_one():
    pixels = np.full((224, 224, 3), 200, dtype=np.uint8)
    pixels[50:60, 160:200] = (200, 200, 231)  # 31 levels in one channel: shape
    pixels[150:160, 10:20] = (170, 230, 200)  # 30 levels: background
    scene = read_scene(pixels)
    assert scene.cells == patch_indices(50, 160, 59, 199) and scene.place == "at the top right"
    assert (scene.background, scene.shape) == ("gray", "gray")


def test_every_stretch_of_words_round_trips_through_the_tiny_tokenizer(engine):
    tokenizer = engine.tokenizer
    for text in every_stretch():
        ids = engine.token_ids[text]
        phrase = tokenizer.decode(
            [engine.token_ids["<phrase>"][0], *ids], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        assert phrase == f"<phrase> {text}", text
        assert tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False) == text

"""The real checkpoint, where one is at hand (``pytest --real-model PATH_OR_ID``): both engines agree and a
grounded caption of a photograph carries boxes inside the image."""

from __future__ import annotations

import pytest
import torch

from serve.app.shipped import photo
from serve.engine.build import build_engine
from serve.engine.config import EngineConfig
from serve.engine.model import load_model
from serve.engine.requests import GenerationRequest, SamplingParams
from serve.kosmos2.images import prepare_image
from serve.kosmos2.tasks import Task, build_prompt
from serve.kosmos2.text import TextCodec
from tests.helpers import LIMITS

pytestmark = pytest.mark.real_model


def test_grounded_caption_of_a_photograph(request):
    loaded = load_model(request.config.getoption("--real-model"))
    codec = TextCodec(loaded.processor)
    image = prepare_image(photo("astronaut"), LIMITS)
    prompt = build_prompt(Task.CAPTION)
    ids = codec.encode(prompt.text)
    requests = [GenerationRequest(image.pixels, ids, SamplingParams(max_new_tokens=48))]
    results = [build_engine(loaded, EngineConfig(kind=kind)).generate(requests)[0] for kind in ("hf", "fast")]
    if loaded.dtype == torch.float32:  # in half precision the two paths may round differently
        assert results[0] == results[1]
    answer = codec.answer(prompt, ids.tolist(), results[1].token_ids, image.width, image.height)
    assert answer.text.startswith("An image of")
    assert answer.entities, answer.text
    for entity in answer.entities:
        assert answer.text[entity.span[0] : entity.span[1]] == entity.phrase
        for x1, y1, x2, y2 in entity.boxes:
            assert 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1

"""Prompt ids equal the processor's; answers equal its post-processing of the text as the model wrote it (no
clean-up of tokenization spaces); streamed pieces add up to the answer."""

from __future__ import annotations

from unittest.mock import Mock

import numpy as np
import pytest

from serve.kosmos2.tasks import Task, build_prompt
from serve.kosmos2.text import AnswerStream, TextCodec
from tests.helpers import photo

PROMPTS = [
    (Task.CAPTION, None, None),
    (Task.DETAILED_CAPTION, None, None),
    (Task.VQA, "What colour is the car on the left?", None),
    (Task.GROUND, "the small red circle", None),
    (Task.DESCRIBE_REGION, None, (0.1, 0.2, 0.6, 0.9)),
    (Task.RAW, "<grounding> An image of<phrase> a dog</phrase>", None),
    (Task.VQA, "Ünïcödé and emoji 🙂 — what?", None),
]


@pytest.mark.parametrize(("task", "text", "region"), PROMPTS)
def test_encode_equals_processor(codec, loaded, task, text, region):
    prompt = build_prompt(task, text, region)
    expected = loaded.processor(text=prompt.text, images=photo(), return_tensors="pt")
    ids = codec.encode(prompt.text)
    assert ids.tolist() == expected["input_ids"][0].tolist()
    assert expected["image_embeds_position_mask"][0].nonzero().flatten().tolist() == list(range(2, 66))


def test_encode_remembers_prompts(loaded):
    """A repeated prompt is not tokenized again, and its shared ids cannot be changed by a caller."""
    codec = TextCodec(loaded.processor)
    codec.tokenizer = Mock(wraps=codec.tokenizer, bos_token=codec.tokenizer.bos_token)
    caption, question = build_prompt(Task.CAPTION).text, build_prompt(Task.VQA, "What is it?").text
    first = codec.encode(caption)
    assert np.array_equal(codec.encode(caption), first) and codec.tokenizer.call_count == 1
    assert len(codec.encode(question)) != len(first) and codec.tokenizer.call_count == 2
    with pytest.raises(ValueError, match="read-only"):
        first[0] = 0


GENERATED = [
    "<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> warming himself by"
    "<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>.",
    "<object><patch_index_0000><patch_index_1023></object> sits there",
    " a dog and a cat",
    "<phrase> man , left</phrase><object><patch_index_0000><patch_index_1023></object> is n't the dog 's ?",
]


@pytest.mark.parametrize("generated", GENERATED)
@pytest.mark.parametrize(("task", "text", "region"), PROMPTS[:5])
def test_answer_equals_processor_post_processing(codec, loaded, task, text, region, generated):
    processor = loaded.processor
    prompt = build_prompt(task, text, region)
    prompt_ids = codec.encode(prompt.text).tolist()
    new_ids = processor.tokenizer(generated, add_special_tokens=False)["input_ids"]
    answer = codec.answer(prompt, prompt_ids, new_ids + [2], 640, 480)
    as_written = {"skip_special_tokens": True, "clean_up_tokenization_spaces": False}
    full = processor.batch_decode([prompt_ids + new_ids + [2]], **as_written)[0]
    clean, entities = processor.post_process_generation(full)
    if not prompt.echo:  # the answer leaves out the prompt's own words (the question, the instruction)
        cut = len(processor.post_process_generation(processor.decode(prompt_ids, **as_written))[0])
        shift = cut + len(clean[cut:]) - len(clean[cut:].lstrip())
        clean = clean[shift:]
        entities = [(name, (s - shift, e - shift), boxes) for name, (s, e), boxes in entities if s >= shift]
    assert answer.text == clean
    for ours, (name, span, boxes) in zip(answer.entities, entities, strict=True):
        assert (ours.span, ours.boxes) == (span, boxes)
        assert ours.phrase == ("" if name.startswith("<patch_index_") else name)
        assert ours.boxes_px == [(x1 * 640, y1 * 480, x2 * 640, y2 * 480) for x1, y1, x2, y2 in boxes]


@pytest.mark.parametrize("generated", GENERATED)
@pytest.mark.parametrize(("task", "text", "region"), PROMPTS[:5])
def test_stream_adds_up_to_the_answer(codec, loaded, task, text, region, generated):
    prompt = build_prompt(task, text, region)
    prompt_ids = codec.encode(prompt.text).tolist()
    new_ids = loaded.processor.tokenizer(generated, add_special_tokens=False)["input_ids"]
    stream = AnswerStream(codec, prompt, prompt_ids)
    pieces = [stream.push([token]) for token in new_ids]
    final = codec.answer(prompt, prompt_ids, new_ids, 100, 100).text
    pieces.append(stream.finish(final))
    assert "".join(pieces) == final
    assert sum(1 for p in pieces if p) > 1 or len(final.split()) <= 1


PUNCTUATED = ["man , left", "the dog 's tail", "guy on right .", "is n't it blue ?", "red ' s one"]
"""RefCOCO-style expressions whose spaces transformers' clean-up would remove (" ,", " 's", " .", " n't" ...)."""


def test_the_tiny_tokenizer_cleans_up_by_default_like_the_real_one(loaded):
    """The fixture is configured as the real checkpoint's tokenizer, so the tests below can fail."""
    tokenizer = loaded.processor.tokenizer
    assert tokenizer.clean_up_tokenization_spaces
    assert tokenizer.decode(tokenizer("man , left", add_special_tokens=False)["input_ids"]) == "man, left"


@pytest.mark.parametrize("expression", PUNCTUATED)
def test_a_grounded_phrase_is_the_expression_as_sent(codec, loaded, expression):
    """The official evaluation compares the echoed phrase with the expression as an exact string."""
    prompt = build_prompt(Task.GROUND, expression)
    prompt_ids = codec.encode(prompt.text).tolist()
    generated = "<object><patch_index_0000><patch_index_1023></object> , it 's there ."
    new_ids = loaded.processor.tokenizer(generated, add_special_tokens=False)["input_ids"]
    answer = codec.answer(prompt, prompt_ids, new_ids + [2], 640, 480)
    assert answer.text == f"{expression} , it 's there ."
    (entity,) = answer.entities
    assert entity.phrase == expression and answer.text[entity.span[0] : entity.span[1]] == expression
    stream = AnswerStream(codec, prompt, prompt_ids)
    pieces = [stream.push([token]) for token in new_ids]
    assert "".join(pieces) + stream.finish(answer.text) == answer.text


def test_every_task_answers_with_the_text_as_the_model_wrote_it(codec, loaded):
    prompt = build_prompt(Task.VQA, "What is it ?")
    prompt_ids = codec.encode(prompt.text).tolist()
    new_ids = loaded.processor.tokenizer(" it 's a dog , is n't it .", add_special_tokens=False)["input_ids"]
    assert codec.answer(prompt, prompt_ids, new_ids, 10, 10).text == "it 's a dog , is n't it ."

"""Answers as tokens arrive: released text never changes and joins to the answer, stop strings cut the text (and
the entities past the cut) whether streamed or not, and each token's text joins to the generated text."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serve.engine.requests import GenerationResult, SamplingParams, TokenLogprobs
from serve.kosmos2.decoding import Decoding
from serve.kosmos2.pipeline import Pipeline, Query
from serve.kosmos2.tasks import Task, build_prompt
from serve.kosmos2.text import TextCodec
from tests.helpers import LIMITS

SNOWMAN = (
    "<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> warming himself by"
    "<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>."
)


def tokens_of(codec: TextCodec, text: str) -> list[int]:
    return codec.tokenizer(text, add_special_tokens=False)["input_ids"]


def fake_logprobs(tokens: list[int], top: int = 2) -> TokenLogprobs:
    return TokenLogprobs(
        [-0.5 - i for i in range(len(tokens))],
        [[token, 6][:top] for token in tokens],
        [[-0.5 - i, -3.0][:top] for i in range(len(tokens))],
    )


def decoding(codec, task=Task.CAPTION, text=None, stop=(), logprobs=False) -> Decoding:
    prompt = build_prompt(task, text)
    return Decoding(codec, prompt, codec.encode(prompt.text).tolist(), (640, 480), stop, logprobs)


def streamed(codec, tokens, **options):
    """Token by token, as a stream: the released texts and tokens, and the outcome."""
    state = decoding(codec, **options)
    releases = [state.opening()]
    logprobs = fake_logprobs(tokens)
    for index, token in enumerate(tokens):
        if state.stopped:
            break
        releases.append(state.push([token], logprobs.slice(index, index + 1)))
    result = None if state.stopped else GenerationResult(tokens, "length", 70, len(tokens), logprobs)
    outcome = state.finish(result)
    releases.append(outcome.rest)
    return releases, outcome, state


def whole(codec, tokens, **options):
    """The result alone, as a plain request."""
    state = decoding(codec, **options)
    return state.finish(GenerationResult(tokens, "length", 70, len(tokens), fake_logprobs(tokens)))


def test_the_released_text_is_the_answer(codec):
    tokens = tokens_of(codec, SNOWMAN)
    releases, outcome, _ = streamed(codec, tokens)
    assert outcome.answer.text == "An image of a snowman warming himself by a fire ."  # spaces as the model wrote
    assert "".join(r.text for r in releases) == outcome.answer.text
    assert releases[0].text == "An image of"  # certain before any token
    assert [e.phrase for e in outcome.answer.entities] == ["a snowman", "a fire"]
    assert outcome.finish_reason == "length" and outcome.tokens is None


def test_a_stop_string_cuts_the_text_and_the_entities_past_it(codec):
    tokens = tokens_of(codec, SNOWMAN)
    for stop, text, phrases in [
        (("warming",), "An image of a snowman ", ["a snowman"]),
        (("man",), "An image of a snow", []),  # the cut falls inside "a snowman": its entity goes
        (("fire", "by"), "An image of a snowman warming himself ", ["a snowman"]),
        (("zebra", "."), "An image of a snowman warming himself by a fire ", ["a snowman", "a fire"]),
    ]:
        releases, outcome, state = streamed(codec, tokens, stop=stop)
        assert outcome.answer.text == text and outcome.finish_reason == "stop", stop
        assert [e.phrase for e in outcome.answer.entities] == phrases
        assert "".join(r.text for r in releases) == text
        assert whole(codec, tokens, stop=stop).answer == outcome.answer  # streamed or not, the same
        if stop != ("zebra", "."):
            assert len(state.token_ids) < len(tokens)  # the stream stopped early: nothing more was pushed


def test_a_stop_string_never_matches_the_prompts_own_words(codec):
    tokens = tokens_of(codec, SNOWMAN)
    outcome = whole(codec, tokens, stop=("image",))
    assert outcome.answer.text.startswith("An image of a snowman") and outcome.finish_reason == "length"


def test_a_possible_stop_string_is_held_until_it_is_not(codec):
    tokens = tokens_of(codec, SNOWMAN)
    releases, outcome, _ = streamed(codec, tokens, stop=("by a tree",))
    assert outcome.finish_reason == "length" and outcome.answer.text.endswith("by a fire .")
    sent = ""
    for release in releases:
        sent += release.text
        assert not sent.endswith((" by", " by a", "by")), sent  # a stop string could have begun there
    assert sent == outcome.answer.text


def test_each_tokens_text_joins_to_the_generated_text(codec):
    tokens = tokens_of(codec, SNOWMAN)
    releases, outcome, _ = streamed(codec, tokens, logprobs=True)
    pieces = [t for r in releases for t in r.tokens]
    assert pieces == outcome.tokens and len(pieces) == len(tokens)
    assert "".join(t.text for t in pieces) == outcome.answer.text.removeprefix("An image of")
    markup = [t.text for t, token in zip(pieces, tokens) if codec.token_texts([token])[0].startswith("<")]
    assert markup and set(markup) == {""}  # grounding markup carries no text of the answer
    assert pieces[0].logprob == -0.5 and pieces[0].top == [("<phrase>", -0.5), (" a", -3.0)]  # id 6 is " a"
    assert whole(codec, tokens, logprobs=True).tokens == outcome.tokens


def test_tokens_cut_by_a_stop_string(codec):
    tokens = tokens_of(codec, SNOWMAN)
    releases, outcome, _ = streamed(codec, tokens, stop=("himself",), logprobs=True)
    pieces = [t for r in releases for t in r.tokens]
    assert pieces == outcome.tokens
    assert "".join(t.text for t in pieces) == outcome.answer.text.removeprefix("An image of")
    assert outcome.answer.text == "An image of a snowman warming "


def test_a_question_is_not_part_of_the_answer(codec):
    tokens = tokens_of(codec, " a red ball.")
    releases, outcome, _ = streamed(codec, tokens, task=Task.VQA, text="what is it?", stop=("ball",), logprobs=True)
    assert outcome.answer.text == "a red " and releases[0].text == ""
    assert "".join(t.text for t in outcome.tokens) == "a red "


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_tokens_any_stops(codec, data):
    """Random tokens (words, markup, lone spaces, angle brackets) and stop strings taken from their text."""
    words = st.integers(3, codec.tokenizer.vocab_size - 1)  # the rest of the vocabulary is markup
    tokens = data.draw(st.lists(st.one_of(words, words, st.integers(3, len(codec.tokenizer) - 1)), max_size=24))
    task = data.draw(st.sampled_from([{"task": Task.CAPTION}, {"task": Task.VQA, "text": "what is it?"}]))
    final = whole(codec, tokens, **task).answer.text
    stop = ()
    if len(final) > 14 and data.draw(st.booleans()):
        start = data.draw(st.integers(11, len(final) - 2))
        stop = (final[start : start + data.draw(st.integers(1, 4))],)
    releases, outcome, _ = streamed(codec, tokens, stop=stop, logprobs=True, **task)
    sent = "".join(r.text for r in releases)
    assert sent == outcome.answer.text == whole(codec, tokens, stop=stop, **task).answer.text
    assert final.startswith(sent)
    pieces = [t for r in releases for t in r.tokens]
    assert pieces == outcome.tokens
    assert outcome.answer.text.endswith("".join(t.text for t in pieces))
    assert all(e.span[1] <= len(sent) for e in outcome.answer.entities)


def test_pipeline_finish_applies_the_stop_strings(loaded, codec):
    pipeline = Pipeline(loaded.processor, LIMITS)
    from serve.kosmos2.images import PreparedImage

    image = PreparedImage(np.zeros((224, 224, 3), dtype=np.uint8), 640, 480)
    prepared = pipeline.prepare(Query(Task.CAPTION, params=SamplingParams(logprobs=2), stop=("fire",)), image)
    tokens = tokens_of(codec, SNOWMAN)
    answer = pipeline.finish(prepared, GenerationResult(tokens, "stop", 71, len(tokens) + 1))
    assert answer.text == "An image of a snowman warming himself by a "


@pytest.mark.parametrize("stop", [(), ("a",)])
def test_nothing_is_released_after_a_stop(codec, stop):
    tokens = tokens_of(codec, SNOWMAN)
    state = decoding(codec, stop=stop)
    for token in tokens:
        state.push([token])
    assert state.stopped == bool(stop)
    if stop:
        assert state.push(tokens[:3]).text == ""

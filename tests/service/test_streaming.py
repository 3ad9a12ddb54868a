"""The Preprocessor around a Generator's token stream, and the Ingress's chunks, without Ray: text goes out as soon
as it is certain, a stop string cancels the generation, and streamed and plain answers agree."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import pytest

from serve.app.client import image_data_uri
from serve.app.config import ServiceConfig
from serve.app.messages import Finished, Job, Started, TextPiece
from serve.app.preprocessor import Preprocessor
from serve.app.streaming import sse_chunks
from serve.engine.requests import Generated, GenerationResult, SamplingParams
from serve.kosmos2.pipeline import Query
from serve.kosmos2.tasks import Task
from serve.kosmos2.text import Answer
from tests.helpers import encode, photo


class FakeStream:
    """A Generator's stream of one request: its tokens one by one, then the result; records a cancel."""

    def __init__(self, result: GenerationResult) -> None:
        logprobs = result.logprobs
        self.items = [
            Generated([token], logprobs.slice(i, i + 1) if logprobs else None)
            for i, token in enumerate(result.token_ids)
        ] + [result]
        self.taken = 0
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.cancelled or self.taken == len(self.items):
            raise StopAsyncIteration
        self.taken += 1
        return self.items[self.taken - 1]

    def cancel(self) -> None:
        self.cancelled = True


class FakeGenerator:
    """Stands in for the Generator's handle, answering every request with ``result``."""

    def __init__(self, result: GenerationResult) -> None:
        self.result = result
        self.streams: list[FakeStream] = []
        self.generate = self
        self.stream = self

    def options(self, stream: bool):
        return self

    def remote(self, request):
        stream = FakeStream(self.result)
        self.streams.append(stream)
        return _Either(stream, self.result)


class _Either:
    """What ``remote`` returns: awaited (``generate``) the result, iterated (``stream``) the tokens."""

    def __init__(self, stream: FakeStream, result: GenerationResult) -> None:
        self.stream, self.result = stream, result

    def __await__(self):
        async def value():
            return self.result

        return value().__await__()

    def __aiter__(self):
        return self.stream

    def cancel(self) -> None:
        self.stream.cancel()


@pytest.fixture(scope="module")
def preprocessor(tiny_dir):
    return Preprocessor(ServiceConfig.model_validate({"model": {"source": str(tiny_dir)}}), None)


QUESTION = Query(Task.VQA, "what is it?", params=SamplingParams(max_new_tokens=40, ignore_eos=True, logprobs=2))


@pytest.fixture(scope="module")
def job():
    return Job("chatcmpl-test", image_data_uri(encode(photo(seed=3))), QUESTION)


@pytest.fixture(scope="module")
def result(preprocessor, job, hf_engine):
    """The reference engine's tokens (and log-probabilities) for the job."""
    prepared = asyncio.run(preprocessor.prepare(job))
    return hf_engine.generate([prepared.request])[0]


def run(preprocessor, job, result, stream: bool):
    preprocessor.generator = FakeGenerator(result)

    async def main():
        if not stream:
            return [await preprocessor.complete(job)]
        return [event async for event in preprocessor.stream(job)]

    return asyncio.run(main()), preprocessor.generator.streams


def test_text_and_tokens_join_to_the_answer(preprocessor, job, result):
    (plain,), _ = run(preprocessor, job, result, stream=False)
    events, _ = run(preprocessor, job, result, stream=True)
    assert isinstance(events[0], Started) and isinstance(events[-1], Finished)
    pieces = [e for e in events if isinstance(e, TextPiece)]
    finished = events[-1]
    assert "".join(p.text for p in pieces) == finished.answer.text == plain.answer.text
    assert [t for p in pieces for t in p.tokens] == finished.tokens == plain.tokens
    assert len(plain.tokens) == len(result.token_ids) == plain.completion_tokens
    assert "".join(t.text for t in plain.tokens) == plain.answer.text  # a question: no words of the prompt echoed
    assert [t.logprob for t in plain.tokens] == result.logprobs.chosen
    assert finished.first_token_s is not None and plain.first_token_s is None


def test_a_stop_string_cancels_the_generation(preprocessor, job, result):
    full = preprocessor.pipeline.finish(asyncio.run(preprocessor.prepare(job)), result).text
    stop = full[6:9]
    stopped = replace(job, query=replace(job.query, stop=(stop,)))
    (plain,), plain_streams = run(preprocessor, stopped, result, stream=False)
    events, streams = run(preprocessor, stopped, result, stream=True)
    finished = events[-1]
    cut = full.find(stop)
    assert finished.answer.text == plain.answer.text == full[:cut]
    assert finished.finish_reason == plain.finish_reason == "stop"
    assert "".join(e.text for e in events if isinstance(e, TextPiece)) == full[:cut]
    for used in (plain_streams, streams):  # a plain request with a stop string is streamed from the Generator
        (fake,) = used
        assert fake.cancelled and fake.taken < len(fake.items)
    assert finished.completion_tokens == streams[0].taken < len(result.token_ids)
    assert all(e.span[1] <= cut for e in finished.answer.entities)


class Paced:
    """Preprocessor events that wait, after the first text piece, until released; records what was asked."""

    def __init__(self) -> None:
        self.asked = 0
        self.release = asyncio.Event()
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        self.asked += 1
        if self.asked == 1:
            return TextPiece("An image")
        if self.asked == 2:
            await self.release.wait()
            return TextPiece(" of")
        if self.asked == 3:
            return Finished(Answer("An image of", []), "length", 70, 2)
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


def test_each_piece_goes_out_before_the_next_event():
    events = Paced()
    closed = []

    async def main():
        chunks = sse_chunks(
            events,
            request_id="chatcmpl-x",
            model="m",
            include_usage=True,
            deadline=float("inf"),
            translate=lambda exc: exc,
            close=lambda status, finished: closed.append(status),
        )
        role = await chunks.__anext__()
        first = await chunks.__anext__()
        asked_then = events.asked  # the piece is out while the next event has not arrived
        events.release.set()
        rest = [chunk async for chunk in chunks]
        return role, first, asked_then, rest

    role, first, asked_then, rest = asyncio.run(main())
    payloads = [json.loads(c.removeprefix("data: ")) for c in [role, first, *rest] if c != "data: [DONE]\n\n"]
    assert payloads[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert payloads[1]["choices"][0]["delta"] == {"content": "An image"} and asked_then == 1
    assert payloads[2]["choices"][0]["delta"] == {"content": " of"}
    final = payloads[3]["choices"][0]
    assert final["delta"] == {"content": "", "entities": []} and final["finish_reason"] == "length"
    assert payloads[4]["choices"] == [] and payloads[4]["usage"]["total_tokens"] == 72
    assert rest[-1] == "data: [DONE]\n\n" and closed == [200] and not events.cancelled

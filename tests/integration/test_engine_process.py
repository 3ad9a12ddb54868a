"""The engine in its own process, as the Generator runs it: same tokens, errors that keep their fields,
cancellation across the socket, and a child that dies or cannot start."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from serve.config import ServiceConfig
from serve.engine import GenerationRequest, GenerationResult
from serve.engine_process import EngineProcess
from serve.errors import InvalidRequest, Unavailable
from serve.sampling import SamplingParams
from tests.integration.test_fastpath import requests_for


def config_for(source: str) -> ServiceConfig:
    return ServiceConfig.model_validate(
        {"model": {"source": source, "device": "cpu"}, "engine": {"max_batch_size": 4, "max_seq_len": 256}}
    )


@pytest.fixture(scope="module")
def engine_process(tiny_dir):
    process = EngineProcess(config_for(str(tiny_dir)))
    yield process
    process.stop()


@pytest.fixture(scope="module")
def work(codec, hf_engine):
    requests = requests_for(codec, [SamplingParams(max_new_tokens=5 + 3 * i) for i in range(7)])
    return requests, [hf_engine.generate([r])[0] for r in requests]


def test_tokens_equal_the_reference(engine_process, work):
    requests, expected = work

    async def main():
        results = await asyncio.gather(*(engine_process.generate(r) for r in requests))
        streamed = [item async for item in engine_process.stream(requests[2])]
        return results, streamed

    results, streamed = asyncio.run(main())
    assert results == expected
    assert streamed[-1] == expected[2] and isinstance(streamed[-1], GenerationResult)
    assert [token for chunk in streamed[:-1] for token in chunk] == expected[2].token_ids
    assert engine_process.description.startswith("fast engine on cpu")


def test_errors_keep_their_fields_and_the_engine_goes_on(engine_process, work):
    requests, expected = work
    too_long = GenerationRequest(requests[0].pixels, requests[0].prompt_ids, SamplingParams(max_new_tokens=250))

    async def main():
        with pytest.raises(InvalidRequest) as caught:
            await engine_process.generate(too_long)
        return caught.value, await engine_process.generate(requests[0])

    error, result = asyncio.run(main())
    assert error.param == "max_tokens" and "exceeds the 256 tokens" in str(error)
    assert result == expected[0] and engine_process.alive


def test_cancelled_requests_leave_the_engine(engine_process, work):
    requests, _ = work
    long = [GenerationRequest(r.pixels, r.prompt_ids, SamplingParams(max_new_tokens=150)) for r in requests[:4]]
    finished = engine_process.stats.finished

    async def main():
        started: set[int] = set()

        async def consume(index: int) -> None:
            async for _ in engine_process.stream(long[index]):
                started.add(index)

        tasks = [asyncio.create_task(consume(i)) for i in range(len(long))]
        while len(started) < len(long):  # every request has its first token: all four are running
            assert not any(task.done() for task in tasks), [task.exception() for task in tasks if task.done()]
            await asyncio.sleep(0.01)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (engine_process.stats.running or engine_process.stats.waiting):
            await asyncio.sleep(0.1)  # the stats come from the child, at least every half second
        return engine_process.stats

    stats = asyncio.run(main())
    assert stats.running == 0 and stats.waiting == 0
    assert stats.finished == finished  # cancelled, not run to their end


def test_a_dead_engine_fails_its_requests_at_once(tiny_dir, work):
    requests, _ = work
    process = EngineProcess(config_for(str(tiny_dir)))
    long = GenerationRequest(requests[0].pixels, requests[0].prompt_ids, SamplingParams(max_new_tokens=150))

    async def main():
        with pytest.raises(Unavailable, match="engine process exited") as caught:
            async for _ in process.stream(long):
                os.kill(process._process.pid, signal.SIGKILL)  # at the first token
        assert (caught.value.status, caught.value.code) == (503, "engine_lost")

    try:
        started = time.monotonic()
        asyncio.run(main())
        assert time.monotonic() - started < 10
        assert not process.alive
        with pytest.raises(Unavailable, match="engine process exited"):
            process.submit(0, long, None)
    finally:
        process.stop()


def test_a_failed_start_says_why(tmp_path):
    with pytest.raises(RuntimeError, match="did not start: ModelUnavailable") as caught:
        EngineProcess(config_for(str(tmp_path)))
    assert f"the folder '{tmp_path}' does not hold a Kosmos-2 model" in str(caught.value)

"""The engine thread seen from asyncio: concurrent callers, streaming, cancellation and errors."""

from __future__ import annotations

import asyncio

import pytest

from serve.config import EngineConfig
from serve.engine import GenerationRequest, GenerationResult
from serve.engine_loop import EngineLoop, EngineStats
from serve.errors import InvalidRequest
from serve.fastpath import FastEngine
from serve.sampling import SamplingParams
from tests.integration.test_fastpath import requests_for


@pytest.fixture(scope="module")
def engine_loop(loaded):
    loop = EngineLoop(FastEngine(loaded, EngineConfig(max_batch_size=4, max_seq_len=160)))
    yield loop
    loop.stop()


@pytest.fixture(scope="module")
def work(codec, hf_engine):
    requests = requests_for(codec, [SamplingParams(max_new_tokens=6 + 4 * i) for i in range(9)])
    return requests, [hf_engine.generate([r])[0] for r in requests]


def test_concurrent_callers_get_their_own_results(engine_loop, work):
    requests, expected = work

    async def main():
        return await asyncio.gather(*(engine_loop.generate(r) for r in requests))

    assert asyncio.run(main()) == expected
    assert engine_loop.stats.finished >= len(requests)


def test_stream_yields_tokens_then_the_result(engine_loop, work):
    requests, expected = work

    async def main():
        return [item async for item in engine_loop.stream(requests[3])]

    items = asyncio.run(main())
    assert isinstance(items[-1], GenerationResult) and items[-1] == expected[3]
    assert [t for chunk in items[:-1] for t in chunk] == expected[3].token_ids


def test_cancelled_callers_free_their_slots(engine_loop, work):
    requests, expected = work
    long = [GenerationRequest(r.pixels, r.prompt_ids, SamplingParams(max_new_tokens=80)) for r in requests[:4]]

    async def main():
        tasks = [asyncio.create_task(engine_loop.generate(r)) for r in long]
        await asyncio.sleep(0.05)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return await asyncio.wait_for(engine_loop.generate(requests[0]), timeout=30)

    assert asyncio.run(main()) == expected[0]
    assert engine_loop.engine.running_count == 0


def test_bad_requests_raise_before_queueing(engine_loop, work):
    requests, _ = work
    bad = GenerationRequest(requests[0].pixels[:100], requests[0].prompt_ids)

    async def main():
        await engine_loop.generate(bad)

    with pytest.raises(InvalidRequest):
        asyncio.run(main())
    assert engine_loop.alive


def test_stats_summarise_a_window():
    before = EngineStats(steps=100, finished=2, generated_tokens=64, busy_s=1.0, step_rows=400)
    after = EngineStats(waiting=3, steps=300, finished=12, generated_tokens=384, busy_s=6.0, step_rows=2000)
    assert after.summary(before, 10) == (
        "engine: 20 steps/s, 1.0 requests/s, 32 tokens/s, mean batch 8.0, busy 50%, 3 waiting"
    )

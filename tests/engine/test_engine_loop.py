"""The engine seen from asyncio, on a thread (``EngineLoop``) and in its own process as the Generator runs it
(``EngineProcess``): concurrent callers get the reference's tokens, streaming, cancellation, errors that keep
their fields, and a child process that dies or cannot start."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest

from serve.engine.config import EngineConfig, ModelConfig
from serve.engine.fast.engine import FastEngine
from serve.engine.loop import EngineLoop
from serve.engine.messages import EngineStats, StartEngine
from serve.engine.process import EngineProcess
from serve.engine.requests import GenerationRequest, GenerationResult, SamplingParams
from serve.errors import InvalidRequest, ServiceError, Unavailable
from tests.helpers import requests_for


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

    before, began = dataclasses.replace(engine_loop.stats), time.perf_counter()
    assert asyncio.run(main()) == expected
    wall = time.perf_counter() - began
    stats = engine_loop.stats
    assert stats.finished - before.finished == len(requests)
    assert 0 < stats.engine_s - before.engine_s <= len(requests) * wall  # each request's time in the engine
    # the engine thread's CPU in steps is part of their wall time; no device here
    assert 0 < stats.step_cpu_s <= stats.busy_s and stats.device_wait_s == 0
    # nine requests, four slots: at least three admissions took them all, within the time in steps
    assert stats.admitted - before.admitted == len(requests) and stats.admissions - before.admissions >= 3
    assert 0 < stats.admission_s - before.admission_s < stats.busy_s - before.busy_s


def test_stream_yields_tokens_then_the_result(engine_loop, work):
    requests, expected = work

    async def main():
        return [item async for item in engine_loop.stream(requests[3])]

    items = asyncio.run(main())
    assert isinstance(items[-1], GenerationResult) and items[-1] == expected[3]
    assert [t for chunk in items[:-1] for t in chunk.token_ids] == expected[3].token_ids


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


def test_a_failed_step_fails_the_requests_in_the_engine_and_the_next_ones_run(loaded, work):
    """A step that raises midway (a defect) leaves its sequences' state unknown: every request in the engine gets
    the error, none a half answer, and the requests after it are answered as usual."""
    requests, expected = work
    lasting = [request for request, result in zip(requests, expected) if result.completion_tokens > 3][:6]
    assert len(lasting) == 6  # none ends before the failing step: each of them must get the error
    engine = FastEngine(loaded, EngineConfig(max_batch_size=4, max_seq_len=160))
    accept, calls = engine.scheduler.accept, []

    def flaky(slots, tokens, logprobs=None):
        calls.append(len(slots))
        if len(calls) == 3:
            raise RuntimeError("a defect in the book-keeping")
        accept(slots, tokens, logprobs)

    engine.scheduler.accept = flaky
    loop = EngineLoop(engine)

    async def main():
        first = await asyncio.gather(*(loop.generate(r) for r in lasting), return_exceptions=True)
        return first, await asyncio.gather(*(loop.generate(r) for r in requests))

    try:
        first, second = asyncio.run(main())
    finally:
        loop.stop()
    failures = [r for r in first if isinstance(r, BaseException)]
    assert [(type(r), r.status, r.code) for r in failures] == [(ServiceError, 500, "engine_error")] * 6
    assert "RuntimeError" in failures[0].message
    assert second == expected
    assert engine.running_count == 0 and sorted(engine.scheduler.free) == list(range(4))


def test_stats_summarise_a_window():
    before = EngineStats(
        steps=100, finished=2, generated_tokens=64, busy_s=1.0, step_rows=400, engine_s=3.0, step_cpu_s=0.5
    )
    after = EngineStats(
        waiting=3,
        steps=300,
        finished=12,
        generated_tokens=384,
        busy_s=6.0,
        step_rows=2000,
        engine_s=5.5,
        step_cpu_s=2.5,
        device_wait_s=1.5,
        admissions=20,
        admitted=12,
        admission_s=2.0,
    )
    assert after.summary(before, 10) == (
        "engine: 20 steps/s, 1.0 requests/s, 32 tokens/s, mean batch 8.0, busy 50% (on a core 20%, "
        "waiting on the device 15%; admitting 20%, 2.0 admissions/s of 0.6 requests), 3 waiting, "
        "250 ms a request in the engine"
    )


# -- the engine in its own process ---------------------------------------------------------------------


def config_for(source: str) -> StartEngine:
    return StartEngine(ModelConfig(source=source, device="cpu"), EngineConfig(max_batch_size=4, max_seq_len=256))


@pytest.fixture(scope="module")
def engine_process(tiny_dir):
    process = EngineProcess(config_for(str(tiny_dir)))
    yield process
    process.stop()


def test_tokens_equal_the_reference(engine_process, work):
    requests, expected = work

    async def main():
        results = await asyncio.gather(*(engine_process.generate(r) for r in requests))
        streamed = [item async for item in engine_process.stream(requests[2])]
        return results, streamed

    results, streamed = asyncio.run(main())
    assert results == expected
    assert streamed[-1] == expected[2] and isinstance(streamed[-1], GenerationResult)
    assert [token for chunk in streamed[:-1] for token in chunk.token_ids] == expected[2].token_ids
    assert engine_process.description.startswith("fast engine on cpu")


def test_the_engine_runs_at_its_priority(engine_process):
    """The child's main thread and the threads it started (the engine loop's, the sender) run at the configured
    niceness where that is permitted (as root, here and in CI), else at the parent's."""
    expected = -10 if os.geteuid() == 0 else os.nice(0)
    tasks = Path(f"/proc/{engine_process._process.pid}/task").iterdir()
    niceness = [int((task / "stat").read_text().rsplit(")", 1)[1].split()[16]) for task in tasks]
    assert os.getpriority(os.PRIO_PROCESS, engine_process._process.pid) == expected
    assert niceness.count(expected) >= 3


def test_errors_keep_their_fields_and_the_engine_goes_on(engine_process, work):
    requests, expected = work
    too_long = GenerationRequest(requests[0].pixels, requests[0].prompt_ids, SamplingParams(max_new_tokens=250))

    async def main():
        with pytest.raises(InvalidRequest) as caught:
            await engine_process.generate(too_long)
        return caught.value, await engine_process.generate(requests[0])

    error, result = asyncio.run(main())
    assert (error.param, error.code) == ("max_tokens", "context_length_exceeded")
    assert "maximum context length is 256 tokens" in str(error)
    assert result == expected[0] and engine_process.alive


def test_cancelled_requests_leave_the_engine(engine_process, work):
    requests, _ = work
    params = SamplingParams(max_new_tokens=150, ignore_eos=True)  # no early end: only a cancel stops them
    long = [GenerationRequest(r.pixels, r.prompt_ids, params) for r in requests[:4]]
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
    params = SamplingParams(max_new_tokens=150, ignore_eos=True)
    long = GenerationRequest(requests[0].pixels, requests[0].prompt_ids, params)

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

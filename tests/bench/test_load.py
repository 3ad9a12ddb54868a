"""The load generator against a stub of the service on 127.0.0.1 whose delays, statuses and tokens are known.

The stub speaks the service's wire format (``serve.app.protocol`` models: JSON completions, SSE chunks with a usage
chunk and ``[DONE]``, the OpenAI error envelope) and Serve's applications endpoint. Each task has a fixed delay,
so every request's true latency is known and the measured percentiles must match it; token counts and error
counts must match exactly.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import socket
import threading
import time

import numpy as np
import pytest
from PIL import Image

from bench.__main__ import main
from bench.load import run_load
from bench.metrics import compute_metrics, percentile
from bench.records import CANCELLED, TIMEOUT, read_json, read_jsonl, read_requests
from bench.schedule import LoadConfig, arrival_times, sweep
from bench.workload import WorkloadConfig, build_workload
from serve.app.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    Choice,
    ChunkChoice,
    Delta,
    ErrorDetail,
    ErrorEnvelope,
    ResponseMessage,
    Usage,
    sse,
)

DELAYS = {"caption": 0.04, "vqa": 0.12, "detailed_caption": 0.08, "ground": 0.01}
"""Seconds the stub waits before answering each task."""

STATUSES = {"ground": 503}
"""Tasks the stub refuses, with the status it answers."""

PROMPT_TOKENS = 70
CHUNKS = 4
CHUNK_GAP = 0.03
"""Streaming: the first content chunk comes after the task's delay, then one every CHUNK_GAP seconds."""

TOLERANCE = 0.05
"""Seconds a measured latency may exceed the stub's delay (scheduling on a busy 2-core machine)."""


class StubService:
    """A tiny HTTP/1.1 server (keep-alive, chunked SSE) in a thread of its own."""

    def __init__(self, delays: dict[str, float] = DELAYS, statuses: dict[str, int] = STATUSES) -> None:
        self.delays, self.statuses = delays, statuses
        self.requests = 0
        self.ignore_eos: set[bool] = set()
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> StubService:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _shutdown(self) -> None:
        self.server.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._connection, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.started = time.monotonic()
        self.ready.set()
        self.loop.run_forever()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers = {}
                while (header := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", 0)))
                await self._route(method, path, body, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):  # closed, or shut down
            return
        finally:
            writer.close()

    async def _route(self, method: str, path: str, body: bytes, writer: asyncio.StreamWriter) -> None:
        if path == "/health":
            return self._send(writer, 200, {"status": "ok"})
        if path == "/v1/models":
            return self._send(writer, 200, {"object": "list", "data": [{"id": "stub-model", "object": "model"}]})
        if path == "/api/serve/applications/":
            return self._send(writer, 200, self.applications())
        self.requests += 1
        request = json.loads(body)
        task = request["task"]
        self.ignore_eos.add(request.get("ignore_eos", False))
        await asyncio.sleep(self.delays[task])
        if task in self.statuses:
            error = ErrorEnvelope(error=ErrorDetail(message="stub refuses", type="service_unavailable"))
            return self._send(writer, self.statuses[task], error.model_dump())
        usage = Usage(
            prompt_tokens=PROMPT_TOKENS,
            completion_tokens=request["max_tokens"],
            total_tokens=PROMPT_TOKENS + request["max_tokens"],
        )
        if not request.get("stream"):
            message = ResponseMessage(content="a stub answer")
            answer = ChatCompletion(
                model="stub", choices=[Choice(message=message, finish_reason="length")], usage=usage
            )
            return self._send(writer, 200, answer.model_dump())
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = {"id": "chatcmpl-stub", "created": 0, "model": "stub"}
        events = [ChatCompletionChunk(**chunk, choices=[ChunkChoice(delta=Delta(role="assistant"))])]
        for i in range(CHUNKS):
            if i:
                await self._flush(writer, events)
                events = []
                await asyncio.sleep(CHUNK_GAP)
            events.append(ChatCompletionChunk(**chunk, choices=[ChunkChoice(delta=Delta(content=f"word{i} "))]))
        events.append(ChatCompletionChunk(**chunk, choices=[ChunkChoice(delta=Delta(), finish_reason="length")]))
        events.append(ChatCompletionChunk(**chunk, choices=[], usage=usage))
        await self._flush(writer, [*events, "[DONE]"])
        writer.write(b"0\r\n\r\n")

    @staticmethod
    async def _flush(writer: asyncio.StreamWriter, events: list) -> None:
        data = "".join(sse(event) for event in events).encode()
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        await writer.drain()

    @staticmethod
    def _send(writer: asyncio.StreamWriter, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        head = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\ncontent-length: {len(data)}\r\n\r\n"
        writer.write(head.encode() + data)

    def applications(self) -> dict:
        """Serve's applications endpoint: the Generator has one replica more per 10 requests served."""
        generator = 1 + self.requests // 10
        replicas = lambda n: [{"replica_id": str(i), "state": "RUNNING"} for i in range(n)]  # noqa: E731
        return {
            "applications": {
                "kosmos": {
                    "deployments": {
                        "Ingress": {"status": "HEALTHY", "target_num_replicas": 1, "replicas": replicas(1)},
                        "Generator": {
                            "status": "UPSCALING",
                            "target_num_replicas": generator + 1,
                            "replicas": [*replicas(generator), {"replica_id": "new", "state": "STARTING"}],
                        },
                    }
                }
            }
        }


@pytest.fixture(scope="module")
def stub():
    with StubService() as service:
        yield service


@pytest.fixture(scope="module")
def workload():
    tasks = {"caption": 2, "vqa": 1, "ground": 1}
    pool = build_workload(WorkloadConfig(resolutions={"64x48": 1.0}, tasks=tasks, max_tokens=7, pool_size=16, seed=3))
    assert {item.task for item in pool} == set(tasks)
    return pool


def load(stub, workload, points, **overrides):
    config = LoadConfig(**{"duration_s": 1.5, "warmup_s": 0.2, "grace_s": 5.0, **overrides})
    return asyncio.run(run_load(stub.url, points, workload, config, progress=False))


def check_latencies_match_stub(records, stream=False):
    """Every successful request took at least its task's delay (plus the streamed gaps), and the percentiles
    are the stub's plus scheduling noise: TOLERANCE for p50 and p90, more for p99 (one hiccup of a busy
    machine moves the p99 of a few dozen requests)."""
    ok = [r for r in records if r.ok and not r.warmup]
    assert len(ok) >= 10
    extra = (CHUNKS - 1) * CHUNK_GAP if stream else 0.0
    true = [DELAYS[r.task] + extra for r in ok]
    measured = [r.latency_s for r in ok]
    assert all(t <= m for t, m in zip(true, measured))
    for q, slack in ((50, TOLERANCE), (90, TOLERANCE), (99, 4 * TOLERANCE)):
        assert percentile(true, q) <= percentile(measured, q) < percentile(true, q) + slack


def test_closed_loop_measures_the_stubs_latencies_tokens_and_errors(stub, workload):
    run = load(stub, workload, sweep(concurrency=[1, 3]))
    assert [p.label for p in run.points] == ["concurrency=1", "concurrency=3"]
    for point in run.points:
        records = [r for r in run.records if r.point == point.index]
        assert [r.index for r in records] == list(range(point.sent))
        assert [r.item for r in records] == [i % len(workload) for i in range(point.sent)]
        check_latencies_match_stub(records)
        steady = [r for r in records if not r.warmup]
        assert all(r.start_s >= point.window_start_s for r in steady)
        metrics = compute_metrics(records, point.window_start_s, point.window_end_s)
        refused = sum(r.task == "ground" for r in steady)
        assert refused > 0
        assert metrics.errors_by_status == {"503": refused}
        assert metrics.requests == len(steady) and metrics.ok == len(steady) - refused
        assert all(r.completion_tokens == 7 and r.prompt_tokens == PROMPT_TOKENS for r in records if r.ok)
        assert metrics.output_tokens_per_s == pytest.approx(7 * metrics.images_per_s)
        # A closed loop keeps `concurrency` requests in flight: Little's law, L = rate x mean latency.
        mean_latency = np.mean([r.latency_s for r in steady])
        assert metrics.requests_per_s * mean_latency == pytest.approx(point.concurrency, rel=0.15)


def test_streaming_measures_time_to_first_token_and_inter_token_latency(stub, workload):
    run = load(stub, workload, sweep(concurrency=[2]), stream=True)
    records = run.records
    check_latencies_match_stub(records, stream=True)
    ok = [r for r in records if r.ok and not r.warmup]
    assert all(len(r.chunk_times_s) == CHUNKS and r.completion_tokens == 7 for r in ok)
    point = run.points[0]
    metrics = compute_metrics(records, point.window_start_s, point.window_end_s)
    stats = metrics.latency_ms
    true_ttft = [DELAYS[r.task] for r in ok]
    assert percentile(true_ttft, 50) <= stats["median_ttft_ms"] / 1000 < percentile(true_ttft, 50) + TOLERANCE
    assert CHUNK_GAP <= stats["median_itl_ms"] / 1000 < CHUNK_GAP + TOLERANCE
    # (CHUNKS - 1) gaps after the first token, over the other six tokens
    assert stats["median_tpot_ms"] / 1000 >= (CHUNKS - 1) * CHUNK_GAP / 6


def test_open_loop_sends_the_poisson_schedule(stub, workload):
    config = {"duration_s": 1.5, "warmup_s": 0.0, "seed": 7}
    run = load(stub, workload, sweep(rates=[20.0]), **config)
    point = run.points[0]
    window = point.window_end_s - point.start_s
    arrivals = arrival_times([(0.0, np.inf, 20.0)], 1.0, np.random.default_rng([7, 0]))
    expected = list(itertools.takewhile(lambda t: t < window, arrivals))
    assert point.sent + point.skipped == len(expected)
    # Requests go out on schedule (never early), each at its own arrival unless skipped.
    assert all(r.start_s >= r.scheduled_s for r in run.records)
    scheduled = sorted(r.scheduled_s - point.start_s for r in run.records)
    assert set(np.round(scheduled, 9)) <= set(np.round(expected, 9))


def test_open_loop_does_not_catch_up_after_stalls(workload):
    slow = {"caption": 0.1, "vqa": 0.1, "ground": 0.1, "detailed_caption": 0.1}
    with StubService(delays=slow, statuses={}) as service:
        run = load(service, workload, sweep(rates=[40.0]), duration_s=1.0, warmup_s=0.0, max_in_flight=1)
    point, records = run.points[0], run.records
    window = point.window_end_s - point.start_s
    arrivals = arrival_times([(0.0, np.inf, 40.0)], 1.0, np.random.default_rng([0, 0]))
    expected = [point.start_s + t for t in itertools.takewhile(lambda t: t < window, arrivals)]
    # Every arrival was either sent or skipped; one in flight at a time allows about ten sends in the second,
    # so most of the forty arrivals were skipped rather than sent late in a burst.
    assert point.sent + point.skipped == len(expected)
    assert point.sent <= 1.0 / 0.1 + 1 and point.skipped >= len(expected) - point.sent > 0
    # One in flight at a time: each request starts after the previous one ended.
    assert all(b.start_s >= a.end_s for a, b in itertools.pairwise(records))
    # Each send is one of the arrivals, in order, never early.
    scheduled = [r.scheduled_s for r in records]
    assert scheduled == sorted(scheduled) and set(np.round(scheduled, 9)) <= set(np.round(expected, 9))
    assert all(r.start_s >= r.scheduled_s for r in records)


def test_deadline_and_drain(workload):
    delays = {"caption": 0.02, "vqa": 3.0, "ground": 0.02, "detailed_caption": 0.02}
    with StubService(delays=delays, statuses={}) as service:
        late = load(service, workload, sweep(concurrency=[2]), duration_s=1.0, warmup_s=0.0, timeout_s=0.3)
        cut = load(service, workload, sweep(concurrency=[2]), duration_s=0.5, warmup_s=0.0, grace_s=0.2)
    timed_out = [r for r in late.records if r.task == "vqa"]
    assert timed_out and all(r.error_type == TIMEOUT and r.status == 0 for r in timed_out)
    assert all(0.3 <= r.latency_s < 0.3 + 4 * TOLERANCE for r in timed_out)
    metrics = compute_metrics(late.records, late.points[0].window_start_s, late.points[0].window_end_s)
    assert metrics.timeouts == len(timed_out) and metrics.timeout_rate == len(timed_out) / metrics.requests
    cancelled = [r for r in cut.records if r.error_type == CANCELLED]
    assert cancelled and all(r.task == "vqa" for r in cancelled)
    metrics = compute_metrics(cut.records, cut.points[0].window_start_s, cut.points[0].window_end_s)
    assert metrics.incomplete == len(cancelled) and metrics.errors == 0


def test_shaped_run_polls_replica_counts(stub, workload):
    config = LoadConfig(duration_s=1.0, warmup_s=0.0, grace_s=5.0)
    points = sweep(shape="10-30:1,30:0.5")
    run = asyncio.run(
        run_load(stub.url, points, workload, config, serve_api=stub.url, poll_interval_s=0.2, progress=False)
    )
    point = run.points[0]
    assert point.window_end_s - point.start_s == pytest.approx(1.5)
    assert [step[2] for step in point.schedule] == [20.0, 30.0]
    deployments = {(s.application, s.deployment) for s in run.replicas}
    assert deployments == {("kosmos", "Ingress"), ("kosmos", "Generator")}
    generator = [s for s in run.replicas if s.deployment == "Generator"]
    assert 5 <= len(generator) <= 12
    assert all(s.target_replicas == s.running_replicas + 1 for s in generator)
    counts = [s.running_replicas for s in generator]
    assert counts == sorted(counts) and counts[-1] > counts[0]
    assert run.replica_poll_failures == 0


def test_absent_serve_api_records_nothing_and_warns_once(stub, workload, caplog):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{free.getsockname()[1]}"
    config = LoadConfig(duration_s=0.6, warmup_s=0.0)
    with caplog.at_level(logging.WARNING, logger="bench.replicas"):
        points = sweep(concurrency=[1])
        work = run_load(stub.url, points, workload, config, serve_api=nobody, poll_interval_s=0.1, progress=False)
        run = asyncio.run(work)
    assert run.replicas == []
    assert run.replica_poll_failures >= 3
    assert len([r for r in caplog.records if "no replica counts" in r.message]) == 1


def test_run_command_writes_consistent_files(tmp_path):
    out = tmp_path / "run"
    args = f"run --url URL --out {out} --concurrency 1,2 --duration 1 --warmup 0.2 --resolutions 64x48"
    args += " --tasks caption:3,ground:1 --seed 3 --max-tokens 5 --ignore-eos --pool-size 8 --nodes g5.xlarge"
    args += " --utilization 0.5 --slo-p99 1.0 --no-progress"
    with StubService() as stub:
        assert main(args.replace("URL", stub.url).split()) == 0
        assert stub.ignore_eos == {True}
    summary = read_json(out / "summary.json")
    assert summary["schema_version"] == 1 and summary["kind"] == "service"
    assert {"git_commit", "versions", "hardware", "config"} <= set(summary)
    assert summary["config"]["workload"]["max_tokens"] == 5 and summary["config"]["workload"]["ignore_eos"]
    records = read_requests(out / "requests.jsonl")
    points = summary["points"]
    assert [p["label"] for p in points] == ["concurrency=1", "concurrency=2"]
    assert len(records) == sum(p["sent"] for p in points)
    for point in points:
        mine = [r for r in records if r.point == point["index"]]
        steady = [r for r in mine if not r.warmup]
        assert point["requests"] == len(steady)
        assert point["errors"] == sum(r.task == "ground" for r in steady) == point["errors_by_status"]["503"]
        assert point["latency_p50_s"] == percentile([r.latency_s for r in steady if r.ok], 50)
        assert point["cost_per_1k_images_usd"] == pytest.approx(1.006 / (point["images_per_s"] * 3600) * 1000)
        assert point["cost_per_1k_images_usd_at_utilization"] == pytest.approx(2 * point["cost_per_1k_images_usd"])
        assert point["slo_met"] is True and point["goodput_images_per_s"] == point["images_per_s"]
        assert point["slo_attainment"] == point["ok"] / point["requests"]
    csv = (out / "summary.csv").read_text().splitlines()
    header = csv[0].split(",")
    assert len(csv) == 3
    for row, point in zip(csv[1:], points):
        values = dict(zip(header, row.split(",")))
        assert float(values["images_per_s"]) == pytest.approx(point["images_per_s"])
        assert float(values["latency_p99_s"]) == pytest.approx(point["latency_p99_s"])
    report = (out / "report.md").read_text()
    assert "0.626" in report and "| concurrency=2 |" in report and "HTTP 503" in report
    for name in ("throughput_latency", "latency_cdf", "timeseries", "cost_vs_latency"):
        with Image.open(out / f"{name}.png") as image:
            assert image.size[0] > 500
    assert read_jsonl(out / "replicas.jsonl") == []


def test_a_streamed_run_reports_latencies_goodput_and_vllms_result_file(stub, tmp_path):
    """TTFT, TPOT, ITL and E2EL with mean, median, std and the percentiles asked for, goodput under two SLOs at
    once, all consistent with the request records, and the same figures under vLLM's field names."""
    out = tmp_path / "streamed"
    args = f"run --url {stub.url} --out {out} --concurrency 2 --duration 1 --warmup 0.2 --resolutions 64x48"
    args += " --tasks caption:1,vqa:1 --max-tokens 7 --pool-size 8 --stream --percentiles 50,90,99.9 --no-progress"
    ttft_slo = 1000 * (DELAYS["caption"] + DELAYS["vqa"]) / 2  # between the two tasks' first-token delays
    assert main([*args.split(), "--goodput", f"ttft:{ttft_slo}", "e2el:60000"]) == 0
    summary = read_json(out / "summary.json")
    assert summary["config"]["model"] == "stub-model" and summary["config"]["percentiles"] == [50, 90, 99.9]
    [point] = summary["points"]
    answered = [r for r in read_requests(out / "requests.jsonl") if r.ok]
    records = [r for r in answered if not r.warmup]
    ttft = [1000 * (r.first_token_s - r.start_s) for r in records]
    assert point["mean_ttft_ms"] == pytest.approx(np.mean(ttft)) and point["std_ttft_ms"] == pytest.approx(np.std(ttft))
    assert point["p99.9_ttft_ms"] == pytest.approx(np.percentile(ttft, 99.9))
    tpot = [1000 * (r.end_s - r.first_token_s) / (r.completion_tokens - 1) for r in records]
    assert point["median_tpot_ms"] == pytest.approx(np.median(tpot))
    itl = [1000 * (b - a) for r in records for a, b in zip(r.chunk_times_s, r.chunk_times_s[1:])]
    assert point["p90_itl_ms"] == pytest.approx(np.percentile(itl, 90)) and len(itl) == (CHUNKS - 1) * len(records)
    assert point["mean_e2el_ms"] == pytest.approx(1000 * np.mean([r.latency_s for r in records]))
    assert "p99_e2el_ms" not in point  # only the percentiles asked for
    # the captions answer within the TTFT SLO, the questions do not: goodput is the captions' rate (rates count
    # what ended in the steady window, warm-up requests included)
    window = [r for r in answered if point["window_start_s"] <= r.end_s < point["window_end_s"]]
    captions = sum(r.task == "caption" for r in window)
    assert 0 < captions < len(window)
    assert point["request_goodput"] == pytest.approx(captions / point["window_s"])
    assert point["goodput_slos_ms"] == {"ttft": ttft_slo, "e2el": 60000}
    [result] = read_jsonl(out / "vllm_bench_serve.jsonl")
    assert result["backend"] == "openai-chat" and result["model_id"] == "stub-model"
    assert result["request_rate"] == "inf" and result["max_concurrency"] == 2
    assert result["completed"] == len(window) and result["duration"] == point["window_s"]
    assert result["request_throughput"] == pytest.approx(point["images_per_s"])
    assert result["request_goodput"] == point["request_goodput"]
    assert result["total_output_tokens"] == 7 * len(window) and result["total_input_tokens"] == 70 * len(window)
    for key in ("mean_ttft_ms", "median_tpot_ms", "std_itl_ms", "p99.9_e2el_ms"):
        assert result[key] == point[key]
    report = (out / "report.md").read_text()
    assert "## Latency (ms)" in report and "| concurrency=2 | TTFT |" in report and "| concurrency=2 | TPOT |" in report
    assert f"## Goodput: TTFT <= {ttft_slo:g} ms, E2EL <= 60000 ms" in report


def test_goodput_on_first_tokens_needs_streaming(stub, tmp_path, capsys):
    args = ["run", "--url", stub.url, "--out", str(tmp_path / "x"), "--goodput", "tpot:50", "--no-progress"]
    assert main(args) == 2
    assert "need --stream" in capsys.readouterr().err
    assert main([*args[:-3], "--goodput", "ttfb:50"]) == 2
    assert "KEY:MILLISECONDS" in capsys.readouterr().err


def test_run_command_refuses_an_unknown_instance_before_sending(stub, tmp_path, capsys):
    code = main(["run", "--url", stub.url, "--out", str(tmp_path / "x"), "--nodes", "g9.huge", "--no-progress"])
    assert code == 2
    assert "no price for instance 'g9.huge'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_report_command_remakes_the_report(stub, tmp_path):
    out = tmp_path / "again"
    args = ["run", "--url", stub.url, "--out", str(out), "--concurrency", "1", "--duration", "0.5", "--warmup-s", "0"]
    assert main([*args, "--resolutions", "64x48", "--pool-size", "4", "--no-progress"]) == 0
    first = (out / "report.md").read_text()
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.md").read_text() == first


def test_several_processes_share_each_point(stub, workload, capsys):
    """Three sending processes: together they keep a closed loop's concurrency in flight (Little's law) and
    send an open loop's whole rate; their records merge on one clock, numbered per point in sending order, and
    this process shows a bar per point counting every request they sent."""
    config = LoadConfig(duration_s=2.0, warmup_s=0.3, grace_s=5.0, seed=5)
    run = asyncio.run(run_load(stub.url, sweep(concurrency=[1, 6], rates=[30.0]), workload, config, processes=3))
    bars = capsys.readouterr().err
    for point in run.points:
        assert f"{point.label}: {point.sent}req" in bars
    for point in run.points:
        records = [r for r in run.records if r.point == point.index]
        assert [r.index for r in records] == list(range(point.sent))
        assert [r.start_s for r in records] == sorted(r.start_s for r in records)
        assert all(point.start_s <= r.start_s <= r.end_s <= point.end_s for r in records)
        check_latencies_match_stub(records)
        assert 0 < point.sender_cpu_s < 3 * (point.end_s - point.start_s)  # three senders' CPU over the point
    closed = [(p, [r for r in run.records if r.point == p.index and not r.warmup]) for p in run.points[:2]]
    for point, steady in closed:
        metrics = compute_metrics(steady, point.window_start_s, point.window_end_s)
        little = metrics.requests_per_s * np.mean([r.latency_s for r in steady])
        assert little == pytest.approx(point.concurrency, rel=0.15)
    assert run.points[0].sent < run.points[1].sent / 3  # one slot, held by one of the processes
    opened = run.points[2]
    assert opened.rate == 30.0 and opened.schedule[0][2] == pytest.approx(30.0)
    window = opened.window_end_s - opened.start_s
    assert 0.6 * 30 * window < opened.sent + opened.skipped < 1.4 * 30 * window  # three Poisson streams of 10/s


def test_a_sending_process_that_fails_fails_the_run(workload):
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        nobody = f"http://127.0.0.1:{free.getsockname()[1]}"
    config = LoadConfig(duration_s=0.5, warmup_s=0.0, ready_timeout_s=1.0)
    began = time.monotonic()
    with pytest.raises(TimeoutError, match="was not ready within 1 s"):
        asyncio.run(run_load(nobody, sweep(concurrency=[2]), workload, config, progress=False, processes=2))
    assert time.monotonic() - began < 30

"""Engine-only benchmark: ``engine.generate`` on the bench workload, without HTTP or Ray.

    python -m bench engine --model microsoft/kosmos-2-patch14-224 --engine hf,fast --batch-sizes 1,8,32 \\
        --max-tokens 32 --out out/engine
    python -m serve tiny /tmp/k2 --real-size && python -m bench engine --model /tmp/k2 --load-format dummy ...

Each engine path (``serve.engine.build_engine``) runs the same requests at each batch size: the workload's
images prepared as the service prepares them (``serve.kosmos2.images.prepare_image``, not timed) and its prompts
encoded as the service encodes them, greedy, ``max_tokens`` new tokens at most. Generation stops at the end
token, so tokens per request are reported as measured; ``--ignore-eos`` forces exactly ``max_tokens``. Per
path and batch size, ``summary.json`` holds ``images_per_s``, ``latency_s`` (one batch, which is every
request's latency in a static batch) and ``tokens_per_s``; ``batches.jsonl`` holds every timed batch. The
service report divides its throughput by these (``python -m bench run ... --engine-baseline DIR``).

``--concurrency 256,512`` adds closed loops at the engine itself, as a service drives it: that many requests
are kept in the engine, running or waiting for a slot (a new one submitted as each finishes), so it admits
while it decodes; after one turnover of requests, ``--seconds`` are timed. ``summary.json``'s ``continuous``
holds per path and level the images/s, request latencies, the sequences running after each step (``mean_batch``:
the fast engine's decode batch; 0 for ``hf``, whose steps run whole batches) and the steps per second.

``--rates 600,800`` adds open loops: requests arrive at that many a second (Poisson, seeded), one at a time, as
a service's CPU tier hands them over, whatever the engine's backlog; after ``OPEN_LOOP_WARMUP_S``,
``--seconds`` are timed. A rate above what the engine sustains shows as throughput below the rate and a
growing queue (``waiting_at_end``). ``summary.json``'s ``open`` holds them, latencies counted from arrival.
"""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.cost import NodeSpec, PriceTable
from bench.metrics import BatchRecord, compute_engine_metrics, percentile
from bench.provenance import provenance
from bench.records import write_json, write_jsonl
from bench.summary import KIND_ENGINE, costs, pricing_header
from bench.workload import WorkItem, WorkloadConfig, build_workload
from serve.app.config import LimitsConfig
from serve.engine.build import build_engine
from serve.engine.config import EngineConfig
from serve.engine.model import LoadedModel, load_model
from serve.engine.requests import GenerationRequest, GenerationResult, SamplingParams
from serve.kosmos2.pipeline import Pipeline, Query
from serve.kosmos2.tasks import Task

PATHS: dict[str, dict[str, str]] = {
    "hf": {"kind": "hf"},
    "fast": {"kind": "fast"},
    "fast-eager": {"kind": "fast", "compile": "off"},
    "fast-sdpa": {"kind": "fast", "decode_attention": "sdpa"},
    "fast-sync": {"kind": "fast", "overlap": False},
    "fast-graphs32": {"kind": "fast", "graph_admission_rows": 32},
    "pixels": {"kind": "pixels"},
}
"""Engine paths by name: the reference, the fast engine, and the fast engine with its layers uncompiled, with
SDPA decode attention, with each decode step's tokens taken before the next is launched, or with admissions in
graphed chunks of 32 requests instead of 256; and the pixel engine, which answers without the model (the
ceiling of everything around the engine)."""


@dataclass(frozen=True)
class EngineBenchConfig:
    """What to measure: the model, engine paths, batch sizes, timed and warm-up batches, and the workload."""

    model: str
    engines: tuple[str, ...] = ("hf",)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    iterations: int = 5
    warmup_iterations: int = 1
    load_format: str = "auto"
    dtype: str = "auto"
    device: str = "auto"
    concurrency: tuple[int, ...] = ()
    rates: tuple[float, ...] = ()
    seconds: float = 10.0
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)

    def __post_init__(self) -> None:
        if not self.engines or not self.batch_sizes or min(self.batch_sizes) < 1 or self.iterations < 1:
            raise ValueError("give at least one engine path, batch sizes >= 1 and at least one timed batch")
        if min(self.concurrency, default=1) < 1 or min(self.rates, default=1) <= 0 or self.seconds <= 0:
            raise ValueError("closed-loop levels must be at least 1, open-loop rates and timed seconds positive")
        if unknown := set(self.engines) - set(PATHS):
            raise ValueError(f"unknown engine paths {sorted(unknown)}; the paths are {', '.join(PATHS)}")


def sampling_params(item: WorkItem) -> SamplingParams:
    """The sampling parameters of a benchmark request: greedy, ``max_tokens`` new tokens at most (exactly, with
    ``ignore_eos``), as the service builds them from the same request."""
    return SamplingParams(max_new_tokens=item.max_tokens, ignore_eos=item.ignore_eos)


def engine_requests(loaded: LoadedModel, items: Sequence[WorkItem]) -> list[GenerationRequest]:
    """The workload as the engine receives it from the service's preprocessing."""
    pipeline = Pipeline(loaded.processor, LimitsConfig().image_limits())
    return [
        pipeline.prepare(Query(Task(item.task), item.text, params=sampling_params(item)), item.image).request
        for item in items
    ]


def device_name(loaded: LoadedModel) -> str:
    """The CUDA device's name, or ``cpu``."""
    return torch.cuda.get_device_name(loaded.device) if loaded.device.type == "cuda" else "cpu"


def _synchronize(loaded: LoadedModel) -> None:
    if loaded.device.type == "cuda":
        torch.cuda.synchronize(loaded.device)


def time_batches(
    engine: Any,
    loaded: LoadedModel,
    kind: str,
    requests: Sequence[GenerationRequest],
    batch_size: int,
    iterations: int,
    warmup: int,
) -> list[BatchRecord]:
    """Run ``warmup`` then ``iterations`` batches of consecutive requests (cycling) and time the latter."""
    timed = []
    for iteration in range(warmup + iterations):
        start = iteration * batch_size
        batch = [requests[(start + j) % len(requests)] for j in range(batch_size)]
        _synchronize(loaded)
        began = time.perf_counter()
        results = engine.generate(batch)
        _synchronize(loaded)
        seconds = time.perf_counter() - began
        if iteration >= warmup:
            timed.append(
                BatchRecord(
                    kind,
                    batch_size,
                    iteration - warmup,
                    seconds,
                    sum(r.prompt_tokens for r in results),
                    sum(r.completion_tokens for r in results),
                    sum(r.finish_reason == "length" for r in results),
                )
            )
    return timed


class _Timed:
    """A sink that records when its request was submitted and when it finished."""

    streaming = False

    def __init__(self, finished: list[tuple[float, float, int]], submitted: float | None = None) -> None:
        self.finished = finished
        self.submitted = time.perf_counter() if submitted is None else submitted

    def tokens(self, token_ids: list[int]) -> None:
        pass

    def finish(self, result: GenerationResult) -> None:
        self.finished.append((self.submitted, time.perf_counter(), result.completion_tokens))

    def fail(self, error: BaseException) -> None:
        raise error


def time_closed_loop(
    engine: Any, kind: str, requests: Sequence[GenerationRequest], concurrency: int, seconds: float
) -> dict[str, Any]:
    """Keep ``concurrency`` requests in the engine for one turnover, then ``seconds`` timed; the figures of the
    requests that finished in the timed window."""
    finished: list[tuple[float, float, int]] = []
    sent = 0

    def advance() -> None:
        if wait := engine.step():
            time.sleep(wait)

    def top_up() -> None:
        nonlocal sent
        while sent - len(finished) < concurrency:
            engine.submit(requests[sent % len(requests)], _Timed(finished))
            sent += 1

    top_up()
    while len(finished) < concurrency:  # warm-up: every first request has finished
        advance()
        top_up()
    start, steps, rows = time.perf_counter(), 0, 0
    while time.perf_counter() - start < seconds:
        advance()
        steps, rows = steps + 1, rows + engine.running_count
        top_up()
    end = time.perf_counter()
    while engine.has_work:  # drain, untimed
        advance()
    return {"path": kind, "concurrency": concurrency, **_window_figures(finished, start, end, steps, rows)}


def _window_figures(
    finished: list[tuple[float, float, int]], start: float, end: float, steps: int, rows: int
) -> dict[str, Any]:
    """Throughput and latencies of the requests that finished in ``[start, end)``, and the window's steps a
    second and mean batch (``rows``: the sequences running after each of its ``steps``, summed)."""
    timed = [(began, ended, tokens) for began, ended, tokens in finished if start <= ended < end]
    latencies = [ended - began for began, ended, _ in timed]
    window = end - start
    return {
        "requests": len(timed),
        "images_per_s": len(timed) / window,
        "tokens_per_s": sum(tokens for _, _, tokens in timed) / window,
        "latency_mean_s": sum(latencies) / len(latencies) if latencies else None,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "mean_batch": rows / max(steps, 1),
        "steps_per_s": steps / window,
    }


OPEN_LOOP_WARMUP_S = 2.0
"""Untimed seconds of an open loop before its timed window: the engine's backlog and batch settle first."""


def time_open_loop(
    engine: Any, kind: str, requests: Sequence[GenerationRequest], rate: float, seconds: float, seed: int = 0
) -> dict[str, Any]:
    """Submit requests at Poisson arrival times, ``rate`` a second, for ``OPEN_LOOP_WARMUP_S`` then ``seconds``
    timed, stepping the engine between arrivals; the figures of the requests that finished in the timed window
    (latency from each one's arrival time). Then the requests still waiting are dropped and the running ones
    finish, untimed."""
    arrivals = random.Random(seed)
    finished: list[tuple[float, float, int]] = []
    sent, steps, rows = 0, 0, 0
    begin = time.perf_counter()
    start, end, arrival = begin + OPEN_LOOP_WARMUP_S, begin + OPEN_LOOP_WARMUP_S + seconds, begin
    while (now := time.perf_counter()) < end:
        while arrival <= now:
            engine.submit(requests[sent % len(requests)], _Timed(finished, submitted=arrival))
            sent += 1
            arrival += arrivals.expovariate(rate)
        if not engine.has_work:
            time.sleep(max(arrival - now, 0.0))
            continue
        if wait := engine.step():
            time.sleep(min(wait, max(arrival - time.perf_counter(), 0.0)))
        if now >= start:
            steps, rows = steps + 1, rows + engine.running_count
    waiting = len(engine.waiting)
    engine.cancel(*(pending.id for pending in engine.waiting))  # an overload's backlog is not worth draining
    while engine.has_work:  # the running ones, untimed
        if wait := engine.step():
            time.sleep(wait)
    return {"path": kind, "rate": rate, **_window_figures(finished, start, end, steps, rows), "waiting_at_end": waiting}


def run_engine_bench(
    config: EngineBenchConfig, out_dir: Path, prices: PriceTable, nodes: Sequence[NodeSpec], utilization: float
) -> dict[str, Any]:
    """Measure every path at every batch size; writes ``batches.jsonl`` and ``summary.json`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_model(config.model, device=config.device, dtype=config.dtype, load_format=config.load_format)
    requests = engine_requests(loaded, build_workload(config.workload))
    longest = max(len(r.prompt_ids) for r in requests) + config.workload.max_tokens
    engine_config = {
        "max_batch_size": max(config.batch_sizes),
        "max_seq_len": max(EngineConfig().max_seq_len, longest),
        "batch_wait_s": 0.0,  # every batch is submitted whole: waiting for more only adds latency
    }
    batches: list[BatchRecord] = []
    continuous: list[dict[str, Any]] = []
    open_loops: list[dict[str, Any]] = []
    for kind in config.engines:
        engine = build_engine(loaded, EngineConfig(**PATHS[kind], **engine_config))
        engine.warm_up()
        for batch_size in config.batch_sizes:
            batches += time_batches(
                engine, loaded, kind, requests, batch_size, config.iterations, config.warmup_iterations
            )
        continuous += [time_closed_loop(engine, kind, requests, level, config.seconds) for level in config.concurrency]
        open_loops += [time_open_loop(engine, kind, requests, rate, config.seconds) for rate in config.rates]
        del engine
        gc.collect()
        if loaded.device.type == "cuda":
            torch.cuda.empty_cache()
    usd_per_hour = prices.usd_per_hour(nodes) if nodes else None
    points = []
    for kind in config.engines:
        for batch_size in config.batch_sizes:
            metrics = compute_engine_metrics([b for b in batches if (b.path, b.batch_size) == (kind, batch_size)])
            points.append({**metrics.to_dict(), **costs(usd_per_hour, metrics.images_per_s, utilization)})
    summary = {
        **provenance({**asdict(config), "engine_config": engine_config}),
        "kind": KIND_ENGINE,
        "gpu": device_name(loaded),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        **pricing_header(prices, nodes, usd_per_hour, utilization),
        "points": points,
        "continuous": continuous,
        "open": open_loops,
    }
    write_jsonl(out_dir / "batches.jsonl", batches)
    write_json(out_dir / "summary.json", summary)
    return summary

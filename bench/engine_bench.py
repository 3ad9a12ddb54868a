"""Engine-only benchmark: ``engine.generate`` on the bench workload, without HTTP or Ray.

    python -m bench engine --model microsoft/kosmos-2-patch14-224 --engine hf,fast --batch-sizes 1,8,32 \\
        --max-tokens 32 --out out/engine
    python -m serve tiny /tmp/k2 --real-size && python -m bench engine --model /tmp/k2 --load-format dummy ...
    python -m bench engine --model M --engine fast --batch-sizes 1024 --concurrency 1024 \\
        --output-lengths 16,32,64,128 --out out/lengths

Each engine path (``serve.engine.build_engine``) runs the same requests at each batch size: the workload's
images prepared as the service prepares them (``serve.kosmos2.images.prepare_image``, not timed) and its prompts
encoded as the service encodes them, greedy, ``max_tokens`` new tokens at most. Generation stops at the end
token, so tokens per request are reported as measured; ``--ignore-eos`` forces exactly ``max_tokens``. Per
path and batch size, ``summary.json`` holds ``images_per_s``, ``latency_s`` (one batch, which is every
request's latency in a static batch) and ``tokens_per_s``; ``batches.jsonl`` holds every timed batch. The
service report divides its throughput by these (``python -m bench run ... --engine-baseline DIR``).

``--output-lengths 16,32,64,128`` measures everything at each of these exact numbers of new tokens
(``ignore_eos``), one after the other on the same engine: what an image costs depends on how long its answer
is, and the pricing estimate (``python -m bench price``) prices each task from these. Every point carries its
``max_tokens``.

``--concurrency 256,512`` adds closed loops at the engine itself, as a service drives it: that many requests
are kept in the engine, running or waiting for a slot (a new one submitted as each finishes), so it admits
while it decodes; after one turnover of requests, ``--duration`` seconds are timed. ``summary.json``'s
``continuous`` holds per path and level the images/s, request latencies, the sequences running after each step
(``mean_batch``: the fast engine's decode batch; 0 for ``hf``, whose steps run whole batches) and the steps per
second.

``--rates 600,800`` adds open loops: requests arrive at that many a second (Poisson, seeded), one at a time, as
a service's CPU tier hands them over, whatever the engine's backlog; after ``OPEN_LOOP_WARMUP_S``,
``--duration`` seconds are timed. A rate above what the engine sustains shows as throughput below the rate and
a growing queue (``waiting_at_end``). ``summary.json``'s ``open`` holds them, latencies counted from arrival.
The loops are in ``bench.engine_loops``. A progress bar counts the measurements (``--no-progress``: none).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from bench.cost import NodeSpec, PriceTable
from bench.engine_loops import time_closed_loop, time_open_loop
from bench.metrics import BatchRecord, compute_engine_metrics
from bench.records import write_json, write_jsonl
from bench.summary import KIND_ENGINE, costs, pricing_header
from bench.workload import WorkItem, WorkloadConfig, build_workload
from serve.app.config import LimitsConfig
from serve.engine.build import build_engine
from serve.engine.config import EngineConfig
from serve.engine.model import LoadedModel, load_model
from serve.engine.requests import GenerationRequest, SamplingParams
from serve.kosmos2.pipeline import Pipeline, Query
from serve.kosmos2.tasks import Task
from serve.provenance import provenance

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
    duration_s: float = 10.0
    output_lengths: tuple[int, ...] = ()
    """Exact numbers of new tokens to measure at, each in turn (ignore_eos); empty: the workload's max_tokens."""
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)

    def __post_init__(self) -> None:
        if not self.engines or not self.batch_sizes or min(self.batch_sizes) < 1 or self.iterations < 1:
            raise ValueError("give at least one engine path, batch sizes >= 1 and at least one timed batch")
        if min(self.concurrency, default=1) < 1 or min(self.rates, default=1) <= 0 or self.duration_s <= 0:
            raise ValueError("closed-loop levels must be at least 1, open-loop rates and timed seconds positive")
        if min(self.output_lengths, default=1) < 1:
            raise ValueError("output lengths must be at least 1 new token")
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


def with_length(requests: Sequence[GenerationRequest], tokens: int) -> list[GenerationRequest]:
    """The same requests generating exactly ``tokens`` new tokens each."""
    return [replace(r, params=replace(r.params, max_new_tokens=tokens, ignore_eos=True)) for r in requests]


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
                    batch[0].params.max_new_tokens,
                )
            )
    return timed


def run_engine_bench(
    config: EngineBenchConfig,
    out_dir: Path,
    prices: PriceTable,
    nodes: Sequence[NodeSpec],
    utilization: float,
    progress: bool = True,
) -> dict[str, Any]:
    """Measure every path at every output length and batch size, then the loops; writes ``batches.jsonl`` and
    ``summary.json`` to ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded = load_model(config.model, device=config.device, dtype=config.dtype, load_format=config.load_format)
    requests = engine_requests(loaded, build_workload(config.workload))
    lengths = config.output_lengths or (config.workload.max_tokens,)
    by_length = {n: with_length(requests, n) if config.output_lengths else requests for n in lengths}
    longest = max(len(r.prompt_ids) for r in requests) + max(lengths)
    engine_config = {
        "max_batch_size": max(config.batch_sizes),
        "max_seq_len": max(EngineConfig().max_seq_len, longest),
        "batch_wait_s": 0.0,  # every batch is submitted whole: waiting for more only adds latency
    }
    batches: list[BatchRecord] = []
    continuous: list[dict[str, Any]] = []
    open_loops: list[dict[str, Any]] = []
    per_length = len(config.batch_sizes) + len(config.concurrency) + len(config.rates)
    bar = tqdm(total=len(config.engines) * len(lengths) * per_length, unit="point", disable=not progress)
    for kind in config.engines:
        bar.set_description(f"{kind}: warming up")
        engine = build_engine(loaded, EngineConfig(**PATHS[kind], **engine_config))
        engine.warm_up()
        for tokens, work in by_length.items():
            mark = {"path": kind, "max_tokens": tokens}
            for batch_size in config.batch_sizes:
                bar.set_description(f"{kind}, {tokens} tokens, batch {batch_size}")
                batches += time_batches(
                    engine, loaded, kind, work, batch_size, config.iterations, config.warmup_iterations
                )
                bar.update()
            for level in config.concurrency:
                bar.set_description(f"{kind}, {tokens} tokens, {level} in flight")
                continuous.append({**mark, **time_closed_loop(engine, work, level, config.duration_s)})
                bar.update()
            for rate in config.rates:
                bar.set_description(f"{kind}, {tokens} tokens, {rate:g} arriving/s")
                open_loops.append({**mark, **time_open_loop(engine, work, rate, config.duration_s)})
                bar.update()
        del engine
        gc.collect()
        if loaded.device.type == "cuda":
            torch.cuda.empty_cache()
    bar.close()
    usd_per_hour = prices.usd_per_hour(nodes) if nodes else None
    points = []
    for kind in config.engines:
        for tokens in lengths:
            for batch_size in config.batch_sizes:
                mine = [b for b in batches if (b.path, b.max_tokens, b.batch_size) == (kind, tokens, batch_size)]
                metrics = compute_engine_metrics(mine)
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

"""Engine-only benchmark: ``engine.generate`` on the bench workload, without HTTP or Ray.

    python -m bench engine --model microsoft/kosmos-2-patch14-224 --engine hf,fast --batch-sizes 1,8,32 \\
        --max-tokens 32 --out out/engine
    python -m serve tiny /tmp/k2 --real-size && python -m bench engine --model /tmp/k2 --load-format dummy ...

Each engine path (``serve.engine.build_engine``) runs the same requests at each batch size: the workload's
images prepared as the service prepares them (``serve.images.prepare_image``, not timed) and its prompts
encoded as the service encodes them, greedy, ``max_tokens`` new tokens at most. Generation stops at the end
token, so tokens per request are reported as measured; ``--ignore-eos`` forces exactly ``max_tokens``. Per
path and batch size, ``summary.json`` holds ``images_per_s``, ``latency_s`` (one batch, which is every
request's latency in a static batch) and ``tokens_per_s``; ``batches.jsonl`` holds every timed batch. The
service report divides its throughput by these (``python -m bench run ... --engine-baseline DIR``).
"""

from __future__ import annotations

import gc
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.cost import NodeSpec, PriceTable
from bench.metrics import BatchRecord, compute_engine_metrics
from bench.provenance import provenance
from bench.records import write_json, write_jsonl
from bench.summary import KIND_ENGINE, costs, pricing_header
from bench.workload import WorkItem, WorkloadConfig, build_workload
from serve.config import EngineConfig, LimitsConfig
from serve.engine import GenerationRequest, build_engine
from serve.images import prepare_image
from serve.model import LoadedModel, load_model
from serve.sampling import SamplingParams
from serve.tasks import Task, build_prompt
from serve.text import TextCodec

PATHS: dict[str, dict[str, str]] = {
    "hf": {"kind": "hf"},
    "fast": {"kind": "fast"},
    "fast-eager": {"kind": "fast", "compile": "off"},
    "fast-sdpa": {"kind": "fast", "decode_attention": "sdpa"},
}
"""Engine paths by name: the reference, the fast engine, and the fast engine with its layers uncompiled or
with SDPA decode attention."""


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
    workload: WorkloadConfig = field(default_factory=WorkloadConfig)

    def __post_init__(self) -> None:
        if not self.engines or not self.batch_sizes or min(self.batch_sizes) < 1 or self.iterations < 1:
            raise ValueError("give at least one engine path, batch sizes >= 1 and at least one timed batch")
        if unknown := set(self.engines) - set(PATHS):
            raise ValueError(f"unknown engine paths {sorted(unknown)}; the paths are {', '.join(PATHS)}")


def sampling_params(item: WorkItem) -> SamplingParams:
    """The sampling parameters of a benchmark request: greedy, ``max_tokens`` new tokens at most (exactly, with
    ``ignore_eos``), as the service builds them from the same request."""
    return SamplingParams(max_new_tokens=item.max_tokens, ignore_eos=item.ignore_eos)


def engine_requests(loaded: LoadedModel, items: Sequence[WorkItem]) -> list[GenerationRequest]:
    """The workload as the engine receives it from the service's preprocessing."""
    codec = TextCodec(loaded.processor, loaded.model.config.latent_query_num)
    limits = LimitsConfig().image_limits()
    return [
        GenerationRequest(
            prepare_image(item.image, limits).pixels,
            codec.encode(build_prompt(Task(item.task), item.text).text),
            sampling_params(item),
        )
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
    for kind in config.engines:
        engine = build_engine(loaded, EngineConfig(**PATHS[kind], **engine_config))
        engine.warm_up()
        for batch_size in config.batch_sizes:
            batches += time_batches(
                engine, loaded, kind, requests, batch_size, config.iterations, config.warmup_iterations
            )
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
    }
    write_jsonl(out_dir / "batches.jsonl", batches)
    write_json(out_dir / "summary.json", summary)
    return summary

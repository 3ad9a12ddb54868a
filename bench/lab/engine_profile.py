"""Where the fast engine's time goes: vision encoding, the admission step (prefill), and decode steps.

    python -m bench.lab.engine_profile --model DIR --load-format dummy --batch-sizes 1,64,256,512 \
        --decode-attention sdpa,triton --compile off,on --out profile.json

For each decode attention, compile setting and batch size it submits that many brief-caption requests (exactly
32 new tokens) to a fresh ``FastEngine`` and times every ``step()`` (the device synchronized before and after),
after one untimed warm-up round that compiles the layers and captures the CUDA graphs; it also times the
engine's vision encoding alone, without CUDA graphs. The admission step holds the vision tower, the prompt
prefill and the first decode step; the other steps are decode steps. Where the admission replays a graph (up to
``engine.graph_admission_rows`` requests), the vision alone, launched kernel by kernel, can take longer than the
whole admission, so the prefill is not derived from the two. ``--kernels N`` adds, at the largest batch, the top
N device kernels of one admission step and one decode step (CUDA graphs off, so each kernel shows).
``--timeline`` adds, at the largest batch, one batch as ``python -m bench engine`` runs it (CUDA graphs, decode
steps overlapped) under ``torch.profiler``: its wall time, the device's busy time, and the longest stretches
the device sat idle, with the device work either side (the host's share of the engine's time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from serve.app.config import LimitsConfig
from serve.engine.config import EngineConfig
from serve.engine.fast.engine import FastEngine
from serve.engine.model import LoadedModel, load_model
from serve.engine.requests import Collector, GenerationRequest, SamplingParams
from serve.kosmos2.images import PreparedImage
from serve.kosmos2.pipeline import Pipeline, Query
from serve.kosmos2.tasks import Task


def synchronize(loaded: LoadedModel) -> None:
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()


def timed(loaded: LoadedModel, work) -> float:
    synchronize(loaded)
    start = time.perf_counter()
    work()
    synchronize(loaded)
    return time.perf_counter() - start


def caption_requests(loaded: LoadedModel, batch: int, tokens: int) -> list[GenerationRequest]:
    """``batch`` brief-caption requests of random images, exactly ``tokens`` new tokens each, prepared as the
    service prepares them."""
    pipeline = Pipeline(loaded.processor, LimitsConfig().image_limits())
    query = Query(Task.CAPTION, params=SamplingParams(max_new_tokens=tokens, ignore_eos=True))
    rng = np.random.default_rng(0)
    images = (PreparedImage(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8), 224, 224) for _ in range(batch))
    return [pipeline.prepare(query, image).request for image in images]


def warmed_engine(loaded: LoadedModel, requests: list[GenerationRequest], **config: Any) -> FastEngine:
    """A fast engine with one slot per request, its layers compiled and graphs captured by one untimed run; its
    decode steps not overlapped, so that each ``step()`` times (and profiles) exactly one step's device work."""
    engine = FastEngine(loaded, EngineConfig(max_batch_size=len(requests), max_seq_len=128, overlap=False, **config))
    engine.warm_up()
    engine.generate(requests)
    return engine


def profile_batch(
    loaded: LoadedModel, batch: int, tokens: int, attention: str, compiled: str
) -> dict[str, float | int | str | bool]:
    """Times of one batch: vision alone, the admission step, and the median decode step (seconds)."""
    requests = caption_requests(loaded, batch, tokens)
    engine = warmed_engine(loaded, requests, decode_attention=attention, compile=compiled)
    on_device = torch.from_numpy(np.stack([r.pixels for r in requests])).to(loaded.device)
    with torch.inference_mode():
        vision = statistics.median(timed(loaded, lambda: engine.runner.encode(on_device)) for _ in range(3))
    for request in requests:
        engine.submit(request, Collector())
    steps = []
    while engine.has_work:
        steps.append(timed(loaded, engine.step))
    decode = statistics.median(steps[1:])
    return {
        "decode_attention": engine.runner.attention,
        "compiled": engine.runner.steps.compiled,
        "batch_size": batch,
        "vision_s": vision,
        "admission_step_s": steps[0],
        "decode_step_s": decode,
        "decode_steps": len(steps) - 1,
        "total_s": sum(steps),
        "images_per_s": batch / sum(steps),
    }


def kernel_table(
    loaded: LoadedModel, batch: int, tokens: int, attention: str, compiled: str, top: int
) -> dict[str, Any]:
    """The ``top`` device kernels by total time in one admission step of ``batch`` requests (vision, prefill,
    first decode step) and in one decode step, from ``torch.profiler``; CUDA graphs off, so each kernel shows.
    On the CPU: the operators by self time."""
    requests = caption_requests(loaded, batch, tokens)
    engine = warmed_engine(loaded, requests, decode_attention=attention, compile=compiled, cuda_graphs=False)
    for request in requests:
        engine.submit(request, Collector())
    on_gpu = loaded.device.type == "cuda"
    activity = torch.profiler.ProfilerActivity.CUDA if on_gpu else torch.profiler.ProfilerActivity.CPU
    table: dict[str, Any] = {
        "decode_attention": engine.runner.attention,
        "compiled": engine.runner.steps.compiled,
        "batch_size": batch,
        "clock": "device" if on_gpu else "cpu (operators' self time)",
    }
    for phase in ("admission_step", "decode_step"):
        with torch.profiler.profile(activities=[activity]) as profiler:
            engine.step()
            synchronize(loaded)
        spent = [(e.device_time_total if on_gpu else e.self_cpu_time_total, e) for e in profiler.key_averages()]
        spent.sort(key=lambda pair: pair[0], reverse=True)
        table[f"{phase}_ms"] = sum(us for us, _ in spent) / 1e3
        table[phase] = [{"kernel": e.key[:160], "calls": e.count, "ms": us / 1e3} for us, e in spent[:top]]
    while engine.has_work:
        engine.step()
    return table


MARK = "bench.lab.engine_profile:generate"
"""The profiler range around the batch :func:`device_timeline` times."""
DEVICE_WORK = ("kernel", "gpu_memcpy", "gpu_memset")
"""Chrome-trace categories of the device's work."""


def device_timeline(loaded: LoadedModel, batch: int, tokens: int, top: int) -> dict[str, Any]:
    """One batch of ``batch`` requests through a warmed fast engine as the engine bench runs it, under
    ``torch.profiler``: :func:`device_gaps` of its trace."""
    requests = caption_requests(loaded, batch, tokens)
    engine = FastEngine(loaded, EngineConfig(max_batch_size=batch, max_seq_len=128))
    engine.warm_up()
    engine.generate(requests)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if loaded.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    synchronize(loaded)
    with torch.profiler.profile(activities=activities) as profiler, torch.profiler.record_function(MARK):
        engine.generate(requests)
        synchronize(loaded)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "trace.json"
        profiler.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    return {"batch_size": batch, "compiled": engine.runner.steps.compiled, **device_gaps(events, top)}


def device_gaps(events: list[dict[str, Any]], top: int) -> dict[str, Any]:
    """From a Chrome trace's events: the wall time of the :data:`MARK` range, the time the device worked in it
    (kernels, copies and fills, overlaps counted once) and how many operations it ran, and the ``top`` longest
    idle stretches: how long, when (from the range's start) and between which device operations (``(start)``,
    ``(end)``: the range's ends)."""
    mark = next(e for e in events if e.get("name") == MARK and e.get("cat") == "user_annotation")
    start, end = mark["ts"], mark["ts"] + mark["dur"]
    work = sorted(
        (e["ts"], e["ts"] + e["dur"], e["name"])
        for e in events
        if e.get("cat") in DEVICE_WORK and start <= e["ts"] < end
    )
    busy, reach, last, gaps = 0.0, start, "(start)", []
    for begin, finish, name in work:
        if begin > reach:
            gaps.append((begin - reach, reach - start, last, name))
        if finish > reach:
            busy += finish - max(begin, reach)
            reach, last = finish, name
    if end > reach:
        gaps.append((end - reach, reach - start, last, "(end)"))
    gaps.sort(reverse=True)
    return {
        "wall_ms": mark["dur"] / 1e3,
        "device_busy_ms": busy / 1e3,
        "device_idle_ms": (mark["dur"] - busy) / 1e3,
        "device_ops": len(work),  # near none where the profiler saw no kernel inside the graphs: gaps mean nothing
        "idle_gaps": len(gaps),
        "longest_gaps": [
            {"ms": gap / 1e3, "at_ms": at / 1e3, "after": after[:100], "before": before[:100]}
            for gap, at, after, before in gaps[:top]
        ],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lab.engine_profile", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,64,256,512")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--decode-attention", default="auto", help="comma-separated: auto, sdpa, triton")
    parser.add_argument("--compile", default="auto", help="comma-separated: auto, on, off")
    parser.add_argument("--kernels", type=int, default=0, help="list this many top kernels at the largest batch")
    parser.add_argument("--timeline", action="store_true", help="where the device idles in a batch, at the largest")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    loaded = load_model(args.model, dtype=args.dtype, load_format=args.load_format)
    rows = [
        profile_batch(loaded, int(batch), args.tokens, attention, compiled)
        for attention in args.decode_attention.split(",")
        for compiled in args.compile.split(",")
        for batch in args.batch_sizes.split(",")
    ]
    name = torch.cuda.get_device_name() if loaded.device.type == "cuda" else "cpu"
    result: dict[str, Any] = {"gpu": name, "dtype": str(loaded.dtype), "tokens": args.tokens, "points": rows}
    largest = max(int(batch) for batch in args.batch_sizes.split(","))
    if args.timeline:
        result["timeline"] = device_timeline(loaded, largest, args.tokens, top=12)
    if args.kernels:
        result["kernels"] = [
            kernel_table(loaded, largest, args.tokens, attention, compiled, args.kernels)
            for attention in args.decode_attention.split(",")
            for compiled in args.compile.split(",")
        ]
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(
            f"{row['decode_attention']:6s} compiled {row['compiled']!s:5s} batch {row['batch_size']:4d}: "
            f"vision {row['vision_s'] * 1e3:7.1f} ms, admission step {row['admission_step_s'] * 1e3:7.1f} ms, "
            f"decode step {row['decode_step_s'] * 1e3:6.2f} ms, "
            f"{row['images_per_s']:7.1f} images/s"
        )
    if args.timeline:
        line = result["timeline"]
        print(
            f"timeline batch {line['batch_size']}: {line['wall_ms']:.1f} ms, device busy {line['device_busy_ms']:.1f} "
            f"ms, idle {line['device_idle_ms']:.1f} ms in {line['idle_gaps']} gaps"
        )


if __name__ == "__main__":
    main()

"""The record of a performance run (``bench.lab.perf_run``): ``perf.json``, gathering the card, each engine path
and batch (at each output length measured), each service load and the headline ratios against the goals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from serve.provenance import provenance

GOAL_TOKENS = 32
"""New tokens a request of the performance goals' workload (``bench.lab.perf_run.WORKLOAD``)."""


def combine(out: Path, commands: list[str], options: dict[str, Any], with_service: bool) -> dict[str, Any]:
    """One record of the run: the card, each engine path and batch, each service load (``with_service``), and
    the ratios."""
    engine = json.loads((out / "engine" / "summary.json").read_text())
    profile = out / "profile.json"
    engine_points = [
        {
            "path": p["path"],
            "max_tokens": p.get("max_tokens", GOAL_TOKENS),
            "batch_size": p["batch_size"],
            "images_per_s": p["images_per_s"],
            "latency_s": p["latency_s"],
        }
        for p in engine["points"]
    ]
    lengths = sorted({p["max_tokens"] for p in engine_points})
    goal = [p for p in engine_points if p["max_tokens"] == GOAL_TOKENS] or engine_points  # the goals' workload
    paths = dict.fromkeys(p["path"] for p in goal)
    best = {path: max(p["images_per_s"] for p in goal if p["path"] == path) for path in paths}
    single = {p["path"]: p["latency_s"] for p in goal if p["batch_size"] == 1}
    loops = [p for p in engine["continuous"] if p["path"] == "fast"]
    looped = max(
        (p["images_per_s"] for p in loops if p.get("max_tokens", GOAL_TOKENS) in (GOAL_TOKENS, None)), default=None
    )
    by_length = {
        n: {
            "static_batch_images_per_s": max(
                p["images_per_s"] for p in engine_points if (p["path"], p["max_tokens"]) == ("fast", n)
            ),
            "closed_loop_images_per_s": max(
                (p["images_per_s"] for p in loops if p.get("max_tokens") == n), default=None
            ),
        }
        for n in lengths
        if any((p["path"], p["max_tokens"]) == ("fast", n) for p in engine_points)
    }
    record = {
        **provenance({key: str(value) for key, value in options.items()}),
        "gpu": engine.get("gpu"),
        "workload": "brief grounded caption, 640x480 JPEG, exactly 32 new tokens",
        "model": "Kosmos-2 architecture; random weights unless the run used the checkpoint",
        "engine": engine_points,
        "engine_closed_loops": engine["continuous"],
        "engine_open_loops": engine["open"],
        "engine_profile": json.loads(profile.read_text()) if profile.exists() else None,
        "headline": {
            "gpu": engine.get("gpu"),
            "engine_fast_images_per_s": best["fast"],
            "engine_hf_images_per_s": best.get("hf"),
            "engine_fast_eager_images_per_s": best.get("fast-eager"),
            "fast_over_hf": best["fast"] / best["hf"] if "hf" in best else None,
            "fast_over_eager": best["fast"] / best["fast-eager"] if "fast-eager" in best else None,
            "engine_fast_closed_loop_images_per_s": looped,
            "engine_single_image_s": single.get("fast"),
            "engine_fast_by_output_length": by_length if len(lengths) > 1 else None,
        },
        "commands": commands,
    }
    if with_service:
        service, headline = service_record(out, best["fast"], single.get("fast"))
        record |= service
        record["headline"] |= headline
    return record


def service_record(out: Path, engine_best: float, engine_single: float | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The service's part of :func:`combine`, and its headline: its figures against the engine's."""
    service = json.loads((out / "service" / "summary.json").read_text())
    steady = json.loads((out / "service-80" / "summary.json").read_text())
    repeat = json.loads((out / "service-peak" / "summary.json").read_text())["points"][0]
    keep = ("images_per_s", "latency_p50_s", "latency_p99_s", "requests", "errors")
    service_points = [{"concurrency": p.get("concurrency"), **{k: p.get(k) for k in keep}} for p in service["points"]]
    peak = max(p["images_per_s"] for p in service_points)
    alone = next(p for p in service_points if p["concurrency"] == 1)
    at80 = {k: steady["points"][0].get(k) for k in (*keep, "rate")}
    record = {
        "service": service_points,
        "service_at_80_percent": at80,
        "service_busiest_again": {"concurrency": repeat.get("concurrency"), **{k: repeat.get(k) for k in keep}},
        "cpu_ms_per_request_at_80_percent": json.loads((out / "cpu_per_request.json").read_text()),
        "service_busiest_by_output_length": {
            int(folder.name.removeprefix("service-").removesuffix("tokens")): {
                k: json.loads((folder / "summary.json").read_text())["points"][0].get(k) for k in keep
            }
            for folder in sorted(out.glob("service-*tokens"))
        },
    }
    headline = {
        "service_images_per_s": peak,
        "service_over_engine": peak / engine_best,
        "p99_at_80_percent_s": at80["latency_p99_s"],
        "single_request_s": alone["latency_p50_s"],
        "single_over_engine": alone["latency_p50_s"] / engine_single if engine_single else None,
    }
    return record, headline


def batch_record(out: Path, headline: dict[str, Any]) -> dict[str, Any]:
    """The batch mode's part of the record (``batch/summary.json``), its figures put in ``headline`` beside the
    engine's and the service's."""
    summary = json.loads((out / "batch" / "summary.json").read_text())
    point = summary["points"][0]
    headline["batch_images_per_s"] = point["images_per_s"]
    headline["batch_over_engine"] = point["images_per_s"] / headline["engine_fast_images_per_s"]
    if headline.get("service_images_per_s"):
        headline["batch_over_service"] = point["images_per_s"] / headline["service_images_per_s"]
    return {"batch": {**point, "memory_peak": summary.get("memory_peak")}}

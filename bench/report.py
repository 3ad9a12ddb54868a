"""The report of a load run (``python -m bench run``): ``summary.csv``, the plots and ``report.md``.

Reports are made from the files alone (``summary.json``, ``requests.jsonl``, ``replicas.jsonl``), so they can
be made again elsewhere: ``python -m bench report DIR [--engine-baseline ENGINE_DIR]``. The writer returns the
path of the Markdown it wrote; plots go beside it (``bench.plots``). The engine-only and preprocessing runs'
reports are in ``bench.engine_report``, the pricing estimate's in ``bench.price_report``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bench import plots
from bench.latency import METRICS
from bench.metrics import time_series
from bench.records import read_json, read_jsonl, read_requests
from bench.replicas import ReplicaSample, replica_changes
from bench.schedule import parse_shape
from bench.tables import markdown_table, plot_label, provenance_lines
from bench.vllm_export import FILE_NAME, write_bench_serve

RUN_COLUMNS = {
    "label": "point",
    "images_per_s": "images/s",
    "requests_per_s": "requests/s",
    "output_tokens_per_s": "output tok/s",
    "latency_p50_s": "p50 (s)",
    "latency_p90_s": "p90 (s)",
    "latency_p95_s": "p95 (s)",
    "latency_p99_s": "p99 (s)",
    "latency_max_s": "max (s)",
    "requests": "requests",
    "errors": "errors",
    "timeouts": "timeouts",
    "skipped": "skipped",
    "cost_per_1k_images_usd": "$/1k @100%",
    "cost_per_1k_images_usd_at_utilization": "$/1k @util",
}
"""The columns of a run's tables, with their headings."""

MAX_SERIES_BINS = 300


def points_frame(summary: dict[str, Any]) -> pd.DataFrame:
    """One row per point, nested fields flattened (``errors_by_status.503``), schedules left out."""
    rows = [{k: v for k, v in point.items() if k != "schedule"} for point in summary["points"]]
    return pd.json_normalize(rows)


def console_table(summary: dict[str, Any]) -> str:
    """The short table printed at the end of a run."""
    frame = points_frame(summary)
    columns = [c for c in ("label", "images_per_s", "latency_p50_s", "latency_p99_s", "errors") if c in frame]
    optional = ("median_ttft_ms", "p99_ttft_ms", "median_itl_ms", "request_goodput", "cost_per_1k_images_usd")
    columns += [c for c in optional if c in frame and frame[c].notna().any()]
    names = {
        **RUN_COLUMNS,
        "median_ttft_ms": "TTFT p50 (ms)",
        "p99_ttft_ms": "TTFT p99 (ms)",
        "median_itl_ms": "ITL p50 (ms)",
        "request_goodput": "goodput/s",
    }
    return frame[columns].rename(columns=names).to_string(index=False, float_format=lambda v: f"{v:.4g}")


def write_run_report(out_dir: Path, engine_dir: Path | None = None) -> Path:
    """``summary.csv``, ``vllm_bench_serve.jsonl``, the plots and ``report.md`` of a load run folder."""
    out_dir = Path(out_dir)
    summary = read_json(out_dir / "summary.json")
    records = read_requests(out_dir / "requests.jsonl")
    replicas = [ReplicaSample(**row) for row in read_jsonl(out_dir / "replicas.jsonl")]
    frame = points_frame(summary)
    frame.to_csv(out_dir / "summary.csv", index=False)
    write_bench_serve(out_dir, summary)
    config, points = summary["config"], summary["points"]
    slo = config.get("slo_p99_s")
    made = _run_plots(out_dir, summary, records, replicas)
    lines = [
        "# Kosmos-2 service benchmark",
        "",
        f"Run started {summary.get('started_at')} against `{config.get('url')}`, "
        f"{len(points)} load point(s), {len(records)} requests.",
        *provenance_lines(summary),
        f"- workload: {_workload_line(config.get('workload', {}))}",
        f"- load: {_load_line(config)}",
        "",
        "## Load points",
        "",
        markdown_table(frame[[c for c in RUN_COLUMNS if c in frame]].rename(columns=RUN_COLUMNS)),
        "",
        "Statistics cover each point's steady window (warm-up excluded). Rates count the requests that completed "
        "inside the window; latencies are those of the steady requests that succeeded; output tokens come from the "
        "server's `usage`. `skipped`: open-loop arrivals dropped because the schedule had fallen behind.",
        "",
        *_cost_section(summary),
        *_slo_section(frame, slo),
        *_latency_section(frame),
        *_goodput_section(frame),
        *_errors_section(frame),
        *_replicas_section(replicas),
        *(_engine_section(summary, read_json(Path(engine_dir) / "summary.json")) if engine_dir else []),
        "## Plots",
        "",
        *[f"![{title}]({name})\n" for title, name in made],
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _workload_line(workload: dict[str, Any]) -> str:
    if not workload:
        return "unknown"
    return (
        f"source {workload.get('source')}, resolutions {workload.get('resolutions')}, formats "
        f"{workload.get('formats')}, tasks {workload.get('tasks')}, max_tokens {workload.get('max_tokens')}"
        f"{' (forced: ignore_eos)' if workload.get('ignore_eos') else ''}, seed {workload.get('seed')}"
    )


def _load_line(config: dict[str, Any]) -> str:
    load = config.get("load", {})
    shape = config.get("shape")
    duration = (
        f"{sum(s.duration_s for s in parse_shape(shape)):g} s (the shape)"
        if shape
        else f"{load.get('duration_s')} s per point"
    )
    return (
        f"duration {duration}, warm-up {load.get('warmup_s')} s / "
        f"{load.get('warmup_requests')} requests, grace {load.get('grace_s')} s, timeout {load.get('timeout_s')} s, "
        f"burstiness {load.get('burstiness')}, max in flight {load.get('max_in_flight')}, "
        f"streaming {load.get('stream')}"
    )


def _cost_section(summary: dict[str, Any]) -> list[str]:
    reference = summary.get("reference_usd_per_1k_images")
    lines = ["## Cost per 1,000 images", ""]
    if not summary.get("nodes"):
        return [*lines, f"No node set was given (`--nodes`), so this run is not priced. Reference: ${reference}.", ""]
    utilization = summary["utilization"]
    priced = [p for p in summary["points"] if p.get("cost_per_1k_images_usd") is not None]
    lines.append(
        f"Nodes {', '.join(summary['nodes'])} at ${summary['usd_per_hour']:.4g}/h (list prices, "
        f"`configs/prices.yaml`); reference price ${reference:.3f} per 1,000 images."
    )
    if priced:
        best = min(priced, key=lambda p: p["cost_per_1k_images_usd"])
        full, real = best["cost_per_1k_images_usd"], best["cost_per_1k_images_usd_at_utilization"]
        lines += [
            "",
            f"The cheapest point, {best['label']} at {best['images_per_s']:.4g} images/s, costs ${full:.4g} per "
            f"1,000 images at 100% utilization ({full / reference:.3g}x the reference) and ${real:.4g} at "
            f"{utilization:.0%} utilization ({real / reference:.3g}x the reference).",
        ]
    return [*lines, ""]


def _slo_section(frame: pd.DataFrame, slo: float | None) -> list[str]:
    if slo is None:
        return []
    columns = {
        "label": "point",
        "latency_p99_s": "p99 (s)",
        "slo_met": "p99 within SLO",
        "slo_attainment": "requests within SLO",
        "goodput_images_per_s": "goodput (images/s)",
    }
    best = frame[frame["slo_met"] == True]  # noqa: E712  (a column of booleans and missing values)
    verdict = (
        f"The highest throughput meeting the SLO is {best['images_per_s'].max():.4g} images/s."
        if len(best)
        else "No point met the SLO."
    )
    return [
        f"## Latency SLO: p99 within {slo:g} s",
        "",
        markdown_table(frame[list(columns)].rename(columns=columns)),
        "",
        verdict,
        "",
    ]


def _latency_section(frame: pd.DataFrame) -> list[str]:
    """Each point's TTFT, TPOT, ITL and end-to-end latency: mean, median, standard deviation, percentiles (ms)."""
    rows = []
    for _, point in frame.iterrows():
        for metric in METRICS:
            stats = {c.removesuffix(f"_{metric}_ms"): point[c] for c in frame if c.endswith(f"_{metric}_ms")}
            if stats and pd.notna(stats.get("mean")):
                rows.append({"point": point["label"], "metric": metric.upper(), **stats})
    if not rows:
        return []
    return [
        "## Latency (ms)",
        "",
        "As vLLM's `bench serve` defines them, over each point's steady successful requests: TTFT from sending to "
        "the first chunk with text, TPOT = (E2EL - TTFT) / (output tokens - 1), ITL the gaps between chunks with "
        "text, E2EL the whole request (TTFT, TPOT and ITL need `--stream`). `std` is the population's. The same "
        f"figures, under vLLM's field names, are in `{FILE_NAME}`.",
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
    ]


def _goodput_section(frame: pd.DataFrame) -> list[str]:
    if "request_goodput" not in frame or frame["request_goodput"].isna().all():
        return []
    prefix = "goodput_slos_ms."
    slos = {c.removeprefix(prefix): frame[c].dropna().iloc[0] for c in frame if c.startswith(prefix)}
    table = frame[["label", "images_per_s", "request_goodput"]].rename(
        columns={"label": "point", "images_per_s": "completions/s", "request_goodput": "goodput (requests/s)"}
    )
    table["share"] = frame["request_goodput"] / frame["images_per_s"]
    return [
        "## Goodput: " + ", ".join(f"{name.upper()} <= {limit:g} ms" for name, limit in slos.items()),
        "",
        "Completions a second in the steady window that met every SLO at once (vLLM's `--goodput`; an answer of "
        "one token counts a TPOT of 0).",
        "",
        markdown_table(table),
        "",
    ]


def _errors_section(frame: pd.DataFrame) -> list[str]:
    status_columns = sorted(c for c in frame if c.startswith("errors_by_status."))
    if not status_columns:
        return []
    table = frame[["label", "error_rate", "timeout_rate", "incomplete", *status_columns]].fillna(0)
    names = {c: f"HTTP {c.split('.')[-1]}" for c in status_columns}
    names.update({"label": "point", "error_rate": "error rate", "timeout_rate": "timeout rate"})
    return [
        "## Errors by status code",
        "",
        markdown_table(table.rename(columns=names)),
        "",
        "Status 0: no HTTP answer (transport error or the client's deadline). `incomplete`: still in flight "
        "when the drain's grace period ended.",
        "",
    ]


def _replicas_section(replicas: Sequence[ReplicaSample]) -> list[str]:
    """When each deployment's target and running replica counts changed (polled from Serve's REST API)."""
    if not replicas:
        return []
    rows = [
        {
            "time (s)": round(s.t_s, 1),
            "deployment": f"{s.application}/{s.deployment}",
            "status": s.status,
            "target": s.target_replicas,
            "running": s.running_replicas,
        }
        for s in replica_changes(replicas)
    ]
    return [
        "## Replicas over time",
        "",
        "Each deployment's replica counts at the start and at every change, from Serve's REST API "
        "(`replicas.jsonl` holds every poll): `target` is the autoscaler's decision, `running` the replicas "
        "serving. Times are seconds from the start of the run, as in the time-series plot.",
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
    ]


def engine_peaks(engine_summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each engine path's fastest point."""
    peaks: dict[str, dict[str, Any]] = {}
    for point in engine_summary["points"]:
        if point["path"] not in peaks or point["images_per_s"] > peaks[point["path"]]["images_per_s"]:
            peaks[point["path"]] = point
    return peaks


def _engine_section(summary: dict[str, Any], engine_summary: dict[str, Any]) -> list[str]:
    service_peak = max(p["images_per_s"] for p in summary["points"])
    rows = [
        {
            "engine path": path,
            "best batch": point["batch_size"],
            "engine images/s": point["images_per_s"],
            "service peak images/s": service_peak,
            "service / engine": service_peak / point["images_per_s"],
        }
        for path, point in engine_peaks(engine_summary).items()
    ]
    ours, theirs = (s["config"].get("workload", {}) for s in (summary, engine_summary))
    differ = [k for k in ("max_tokens", "ignore_eos", "tasks", "resolutions") if ours.get(k) != theirs.get(k)]
    note = f" Note: the workloads differ in {', '.join(differ)}." if differ else ""
    tokens = [_mean_tokens(s["points"], count) for s, count in ((summary, "ok"), (engine_summary, "images"))]
    if differ and None not in tokens:
        note += f" Answers averaged {tokens[0]:.3g} new tokens in the service and {tokens[1]:.3g} in the engine run."
    return [
        "## Service vs engine alone",
        "",
        f"The engine-only run (on {engine_summary.get('gpu')}) measures the same workload without HTTP or Ray; "
        f"the ratio is what the service keeps of the engine's best throughput.{note}",
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
    ]


def _mean_tokens(points: Sequence[dict[str, Any]], count: str) -> float | None:
    """New tokens per answer over a run's points, each point weighted by its ``count`` field (None if unknown).

    >>> _mean_tokens([{"completion_tokens_mean": 10, "ok": 1}, {"completion_tokens_mean": 4, "ok": 2}], "ok")
    6.0
    """
    pairs = [(p.get("completion_tokens_mean"), p.get(count)) for p in points]
    pairs = [(mean, n) for mean, n in pairs if mean is not None and n]
    total = sum(n for _, n in pairs)
    return sum(mean * n for mean, n in pairs) / total if total else None


def _run_plots(
    out_dir: Path, summary: dict[str, Any], records: Sequence[Any], replicas: Sequence[ReplicaSample]
) -> list[tuple[str, str]]:
    """Draw a run's plots; returns (title, file name) of each."""
    points, config = summary["points"], summary["config"]
    slo = config.get("slo_p99_s")
    made = []
    sweep = [p for p in points if p["x"] is not None and p["mode"] != "shape"]
    if sweep:
        closed = all(p["mode"] == "closed" for p in sweep)
        x_label = "concurrency (requests in flight)" if closed else "offered rate (requests / s)"
        data = [(p["x"], p["images_per_s"], p["latency_p99_s"]) for p in sweep]
        plots.sweep_plot({_nodes_name(summary): data}, x_label, out_dir / "throughput_latency.png", slo)
        made.append(("throughput and p99 latency", "throughput_latency.png"))
    latencies = {
        p["label"]: [r.latency_s for r in records if r.point == p["index"] and r.ok and not r.warmup] for p in points
    }
    plots.latency_cdf_plot(latencies, out_dir / "latency_cdf.png", slo)
    made.append(("latency CDF", "latency_cdf.png"))
    end = max([p["end_s"] for p in points] + [r.end_s for r in records])
    bin_s = max(1.0, math.ceil(end / MAX_SERIES_BINS))
    schedule = [tuple(step) for p in points for step in p.get("schedule", [])]
    spans = [(p["window_start_s"], p["window_end_s"], p["label"]) for p in points]
    plots.time_series_plot(time_series(records, bin_s, end), schedule, replicas, spans, out_dir / "timeseries.png")
    made.append(("rate, latency and replicas over time", "timeseries.png"))
    priced = [p for p in points if p.get("cost_per_1k_images_usd_at_utilization") is not None and p["latency_p99_s"]]
    if priced:
        data = [(p["latency_p99_s"], p["cost_per_1k_images_usd_at_utilization"], plot_label(p)) for p in priced]
        plots.cost_latency_plot(
            {_nodes_name(summary): data},
            summary["reference_usd_per_1k_images"],
            out_dir / "cost_vs_latency.png",
            summary["utilization"],
        )
        made.append(("cost per 1,000 images vs p99 latency", "cost_vs_latency.png"))
    return made


def _nodes_name(summary: dict[str, Any]) -> str:
    return ", ".join(summary.get("nodes") or []) or "unpriced nodes"

"""Tables and Markdown reports from a bench output folder's files (pandas; the only module importing it).

Reports are made from the files alone (``summary.json``, ``requests.jsonl``, ``replicas.jsonl``), so they can
be made again elsewhere: ``python -m bench report DIR [--engine-baseline ENGINE_DIR]``. Each writer returns
the path of the Markdown it wrote; plots go beside it (``bench.plots``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bench import plots
from bench.cost import cost_per_1k_images
from bench.load import parse_shape
from bench.metrics import time_series
from bench.pricing import PriceRow
from bench.records import read_json, read_jsonl, read_requests
from bench.replicas import ReplicaSample, replica_changes

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


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table; floats to 4 significant digits, missing values as a dash.

    >>> print(markdown_table(pd.DataFrame({"a": [1.23456, None], "b": ["x", "y"]})))
    | a | b |
    |---|---|
    | 1.235 | x |
    | – | y |
    """
    lines = ["| " + " | ".join(str(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def points_frame(summary: dict[str, Any]) -> pd.DataFrame:
    """One row per point, nested fields flattened (``errors_by_status.503``), schedules left out."""
    rows = [{k: v for k, v in point.items() if k != "schedule"} for point in summary["points"]]
    return pd.json_normalize(rows)


def console_table(summary: dict[str, Any]) -> str:
    """The short table printed at the end of a run."""
    frame = points_frame(summary)
    columns = [c for c in ("label", "images_per_s", "latency_p50_s", "latency_p99_s", "errors") if c in frame]
    columns += [c for c in ("cost_per_1k_images_usd",) if c in frame and frame[c].notna().any()]
    return frame[columns].rename(columns=RUN_COLUMNS).to_string(index=False, float_format=lambda v: f"{v:.4g}")


def provenance_lines(summary: dict[str, Any]) -> list[str]:
    hardware = summary.get("hardware", {})
    versions = ", ".join(f"{k} {v}" for k, v in summary.get("versions", {}).items() if v)
    return [
        f"- commit `{summary.get('git_commit') or 'unknown'}`, schema version {summary.get('schema_version')}",
        f"- bench host: {hardware.get('cpu_model')}, {hardware.get('cpu_cores')} cores, "
        f"{hardware.get('memory_gib')} GiB, GPUs: {', '.join(hardware.get('gpus') or []) or 'none'}",
        f"- versions: {versions}",
    ]


def write_run_report(out_dir: Path, engine_dir: Path | None = None) -> Path:
    """``summary.csv``, the plots and ``report.md`` of a load run folder."""
    out_dir = Path(out_dir)
    summary = read_json(out_dir / "summary.json")
    records = read_requests(out_dir / "requests.jsonl")
    replicas = [ReplicaSample(**row) for row in read_jsonl(out_dir / "replicas.jsonl")]
    frame = points_frame(summary)
    frame.to_csv(out_dir / "summary.csv", index=False)
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
        *_streaming_section(frame),
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


def _streaming_section(frame: pd.DataFrame) -> list[str]:
    if "ttft_p50_s" not in frame or frame["ttft_p50_s"].isna().all():
        return []
    columns = {
        "label": "point",
        "ttft_p50_s": "TTFT p50 (s)",
        "ttft_p99_s": "TTFT p99 (s)",
        "itl_p50_s": "ITL p50 (s)",
        "itl_p99_s": "ITL p99 (s)",
    }
    return ["## Streaming", "", markdown_table(frame[list(columns)].rename(columns=columns)), ""]


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
        data = [(p["latency_p99_s"], p["cost_per_1k_images_usd_at_utilization"], _short(p)) for p in priced]
        plots.cost_latency_plot(
            {_nodes_name(summary): data},
            summary["reference_usd_per_1k_images"],
            out_dir / "cost_vs_latency.png",
            summary["utilization"],
        )
        made.append(("cost per 1,000 images vs p99 latency", "cost_vs_latency.png"))
    return made


def _short(point: dict[str, Any]) -> str:
    """A point's label for a plot: c=4, 2/s, b=32.

    >>> _short({"mode": "closed", "concurrency": 4}), _short({"mode": "open", "rate": 2.0}), _short({"batch_size": 8})
    ('c=4', '2/s', 'b=8')
    """
    if "batch_size" in point:
        return f"b={point['batch_size']}"
    if point.get("mode") == "closed":
        return f"c={point['concurrency']}"
    return "shape" if point.get("mode") == "shape" else f"{point['rate']:g}/s"


def _nodes_name(summary: dict[str, Any]) -> str:
    return ", ".join(summary.get("nodes") or []) or "unpriced nodes"


CONTINUOUS_COLUMNS = {
    "path": "path",
    "concurrency": "in flight",
    "requests": "requests",
    "images_per_s": "images/s",
    "tokens_per_s": "output tok/s",
    "latency_mean_s": "mean (s)",
    "latency_p50_s": "p50 (s)",
    "latency_p99_s": "p99 (s)",
    "mean_batch": "mean batch",
    "steps_per_s": "steps/s",
}
"""The closed-loop table of an engine report, with its column titles."""

OPEN_COLUMNS = {
    "path": "path",
    "rate": "arriving/s",
    **{key: title for key, title in CONTINUOUS_COLUMNS.items() if key not in ("path", "concurrency", "latency_mean_s")},
    "waiting_at_end": "waiting at the end",
}
"""The open-loop table of an engine report, with its column titles."""


def write_engine_report(out_dir: Path) -> Path:
    """``summary.csv``, ``engine_throughput.png`` and ``report.md`` of an engine-only run folder."""
    out_dir = Path(out_dir)
    summary = read_json(out_dir / "summary.json")
    frame = pd.DataFrame(summary["points"])
    frame.to_csv(out_dir / "summary.csv", index=False)
    series = {path: list(zip(group["batch_size"], group["images_per_s"])) for path, group in frame.groupby("path")}
    plots.engine_plot(series, out_dir / "engine_throughput.png")
    config = summary["config"]
    columns = {
        "path": "path",
        "batch_size": "batch",
        "images_per_s": "images/s",
        "latency_s": "batch latency (s)",
        "latency_p99_s": "p99 (s)",
        "tokens_per_s": "output tok/s",
        "completion_tokens_mean": "tokens/request",
        "finished_by_length_fraction": "hit max_tokens",
        "cost_per_1k_images_usd": "$/1k @100%",
    }
    lines = [
        "# Kosmos-2 engine-only benchmark",
        "",
        f"Model `{config['model']}` ({config['load_format']} weights, {summary['dtype']}) on {summary['gpu']}; "
        f"{config['iterations']} timed batches per point after {config['warmup_iterations']} warm-up; greedy, "
        + (
            f"exactly {config['workload']['max_tokens']} new tokens (ignore_eos)."
            if config["workload"].get("ignore_eos")
            else f"max_tokens {config['workload']['max_tokens']} (generation stops at the end token, so "
            "tokens/request is reported as measured)."
        ),
        *provenance_lines(summary),
        "",
        markdown_table(frame[[c for c in columns if c in frame]].rename(columns=columns)),
        "",
        "![engine throughput](engine_throughput.png)",
        "",
    ]
    if summary.get("continuous"):
        lines += [
            "## Closed loops at the engine",
            "",
            f"Requests kept in the engine (a new one as each finishes), {config['seconds']:g} s timed after one "
            "turnover: the engine admits while it decodes, as under a service's load. Mean batch: sequences "
            "running after each step (0 for hf, whose steps run whole batches).",
            "",
            markdown_table(pd.DataFrame(summary["continuous"]).rename(columns=CONTINUOUS_COLUMNS)),
            "",
        ]
    if summary.get("open"):
        frame = pd.DataFrame(summary["open"])
        lines += [
            "## Open loops at the engine",
            "",
            "Requests arriving one at a time at the rate given (Poisson), as a service's CPU tier hands them over, "
            f"{config['seconds']:g} s timed after a warm-up; latency from arrival. Throughput below the rate, "
            "and requests left waiting, mean the engine cannot sustain it.",
            "",
            markdown_table(frame[[c for c in OPEN_COLUMNS if c in frame]].rename(columns=OPEN_COLUMNS)),
            "",
        ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_preprocess_report(out_dir: Path) -> Path:
    """``report.md`` of a preprocessing run folder."""
    out_dir = Path(out_dir)
    summary = read_json(out_dir / "summary.json")
    frame = pd.DataFrame([{"path": name, **values} for name, values in summary["paths"].items()])
    columns = {
        "path": "path",
        "images_per_s_per_core": "images/s per core",
        "speedup_vs_hf": "speedup vs hf",
        "images": "images",
        "seconds": "seconds",
        "pixel_mean_abs_diff": "mean abs. diff. vs exact (levels)",
        "pixel_max_abs_diff": "max abs. diff. vs exact (levels)",
    }
    config = summary["config"]
    lines = [
        "# Image preprocessing benchmark (one core)",
        "",
        f"{config['images']} distinct {config['resolution']} JPEGs (mean {summary['mean_jpeg_bytes'] / 1024:.0f} "
        "KiB), single-threaded, the paths alternating in rounds. `hf`: PIL decode then the Kosmos-2 image "
        "processor (resize and normalize to float). `ours_exact`: `serve.kosmos2.images.prepare_image` (decode, "
        "checks, "
        "squash-resize to 224x224 uint8, the processor's pixels; normalization happens later on the GPU). "
        "`ours_fast`: the same with `limits.fast_jpeg: true` (JPEGs decoded at reduced scale with libjpeg's DCT "
        "scaling before the resize); its pixel deviation from `ours_exact` is the absolute difference over every "
        "channel of every pixel of every image, in levels of 0..255. Rates count CPU seconds; allocator: "
        f"{summary.get('allocator', 'default')}.",
        *provenance_lines(summary),
        "",
        markdown_table(frame[[c for c in columns if c in frame]].rename(columns=columns)),
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def write_price_report(
    rows: Sequence[PriceRow],
    summaries: dict[str, dict[str, Any]],
    out_dir: Path,
    slo_p99_s: float | None = None,
    max_error_rate: float = 0.01,
) -> Path:
    """``pricing.md``, ``pricing.csv``, ``pricing.png`` and ``cost_vs_latency.png`` for priced runs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame([row.to_dict() for row in rows])
    frame.to_csv(out_dir / "pricing.csv", index=False)
    reference = rows[0].reference_usd_per_1k_images
    utilization, margin = rows[0].utilization, rows[0].margin
    names = [f"{row.nodes}\n({row.run})" for row in rows]
    plots.price_bars_plot(
        names,
        {
            "cost @100% utilization": [_zero(r.cost_per_1k_images_usd) for r in rows],
            f"cost @{utilization:.0%} utilization": [_zero(r.cost_per_1k_images_usd_at_utilization) for r in rows],
            f"list price @{margin:.0%} margin": [_zero(r.list_price_per_1k_images_usd) for r in rows],
        },
        reference,
        out_dir / "pricing.png",
    )
    series = {}
    for row in rows:
        points = summaries[row.run]["points"]
        series[f"{row.nodes} ({row.run})"] = [
            (p["latency_p99_s"], cost_per_1k_images(row.usd_per_hour, p["images_per_s"], utilization), _short(p))
            for p in points
            if p.get("latency_p99_s") and p["images_per_s"] > 0
        ]
    plots.cost_latency_plot(series, reference, out_dir / "cost_vs_latency.png", utilization)
    columns = {
        "run": "run",
        "nodes": "nodes",
        "bench_host": "measured on",
        "point": "point priced",
        "usd_per_hour": "$/h",
        "images_per_s": "images/s",
        "latency_p99_s": "p99 (s)",
        "cost_per_1k_images_usd": "$/1k @100%",
        "cost_per_1k_images_usd_at_utilization": f"$/1k @{utilization:.0%}",
        "list_price_per_1k_images_usd": f"list $/1k @{margin:.0%} margin",
        "list_price_vs_reference": "list / reference",
    }
    lines = [
        "# Kosmos-2 pricing estimate",
        "",
        f"Per run: the fastest point with an error rate of at most {max_error_rate:.1%}"
        + (f" and p99 latency within {slo_p99_s:g} s" if slo_p99_s is not None else "")
        + ", priced on its node set at list prices (`configs/prices.yaml`: on-demand list prices as of their "
        "capture date, to be refreshed before use).",
        "",
        f"Cost = Σ node $/h ÷ (images/s × 3600) × 1000 ÷ utilization; list price = cost at {utilization:.0%} "
        f"utilization ÷ (1 − {margin:.0%} margin). Reference: ${reference:.3f} per 1,000 images.",
        "",
        markdown_table(frame[list(columns)].rename(columns=columns)),
        "",
        "![price per 1,000 images](pricing.png)",
        "",
        "![cost vs p99 latency](cost_vs_latency.png)",
        "",
        "Runs:",
        *[
            f"- {row.run}: started {summaries[row.run].get('started_at', '–')}, commit "
            f"`{summaries[row.run].get('git_commit') or 'unknown'}`, bench host {row.bench_host}"
            for row in rows
        ],
        "",
    ]
    path = out_dir / "pricing.md"
    path.write_text("\n".join(lines))
    return path


def _zero(value: float | None) -> float:
    return 0.0 if value is None else value

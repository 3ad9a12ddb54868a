"""The reports of the runs that measure a part alone: the engine (``python -m bench engine``: ``summary.csv``,
``engine_throughput.png`` and ``report.md``) and the image paths (``python -m bench preprocess``: ``report.md``),
made from the run folder's ``summary.json``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench import plots
from bench.records import read_json
from bench.tables import markdown_table, provenance_lines

CONTINUOUS_COLUMNS = {
    "path": "path",
    "max_tokens": "new tokens",
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
    "max_tokens": "new tokens",
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
    config = summary["config"]
    lengths = config.get("output_lengths") or []
    series = {
        (f"{path}, {tokens} tokens" if lengths else path): list(zip(group["batch_size"], group["images_per_s"]))
        for (path, tokens), group in frame.groupby(["path", _tokens(frame)], sort=False)
    }
    plots.engine_plot(series, out_dir / "engine_throughput.png")
    columns = {
        "path": "path",
        "max_tokens": "new tokens",
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
            f"exactly {', '.join(map(str, lengths))} new tokens in turn (ignore_eos)."
            if lengths
            else f"exactly {config['workload']['max_tokens']} new tokens (ignore_eos)."
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
            f"Requests kept in the engine (a new one as each finishes), {_duration(config):g} s timed after one "
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
            f"{_duration(config):g} s timed after a warm-up; latency from arrival. Throughput below the rate, "
            "and requests left waiting, mean the engine cannot sustain it.",
            "",
            markdown_table(frame[[c for c in OPEN_COLUMNS if c in frame]].rename(columns=OPEN_COLUMNS)),
            "",
        ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


def _tokens(frame: pd.DataFrame) -> pd.Series:
    """Each point's output length (0 where the summary does not record one)."""
    return frame["max_tokens"] if "max_tokens" in frame else pd.Series(0, index=frame.index, name="max_tokens")


def _duration(config: dict) -> float:
    """The timed seconds of each loop: ``duration_s``, or ``seconds`` in summaries that name it so."""
    return config.get("duration_s", config.get("seconds"))


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

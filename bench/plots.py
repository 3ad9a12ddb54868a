"""The bench's PNG plots (matplotlib, Agg backend; the only module that imports matplotlib).

Each function takes plain data (lists, dicts, dataclasses), writes one PNG and returns its path; titles, axis
labels with units and legends are always set. The reports (``bench.report``, ``bench.engine_report``,
``bench.price_report``) decide which plots they hold.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter, LogLocator

from bench.metrics import SeriesBin
from bench.replicas import ReplicaSample

DPI = 120
REFERENCE_STYLE = {"color": "black", "linestyle": "--", "linewidth": 1.2}
SLO_STYLE = {"color": "tab:red", "linestyle": ":", "linewidth": 1.2}

SweepPoint = tuple[float, float, float | None]
"""(x: concurrency or offered rate, images/s, p99 latency in s)."""


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def sweep_plot(
    series: dict[str, Sequence[SweepPoint]], x_label: str, path: Path, slo_p99_s: float | None = None
) -> Path:
    """Throughput and p99 latency against concurrency or offered rate, one line per series (an offered-rate
    axis also shows throughput = offered rate, what a service that keeps up serves)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    xs_all = sorted({p[0] for points in series.values() for p in points})
    tops = {left: 0.0, right: slo_p99_s or 0.0}
    for name, points in series.items():
        points = sorted(points)
        xs = [p[0] for p in points]
        throughput = [p[1] for p in points]
        latency = [p[2] if p[2] is not None else float("nan") for p in points]
        left.plot(xs, throughput, marker="o", label=name)
        right.plot(xs, latency, marker="o", label=name)
        tops[left] = max([tops[left], *throughput])
        tops[right] = max([tops[right], *(v for v in latency if not math.isnan(v))])
    if "rate" in x_label:
        left.plot(xs_all, xs_all, color="grey", linestyle="--", linewidth=1, label="offered rate")
        tops[left] = max(tops[left], *xs_all)
    if slo_p99_s is not None:
        right.axhline(slo_p99_s, label=f"SLO p99 {slo_p99_s:g} s", **SLO_STYLE)
    for ax, title, ylabel in ((left, "Throughput", "images / s"), (right, "p99 latency", "p99 latency (s)")):
        ax.set_title(f"{title} vs {x_label.split(' (')[0]}")
        ax.set_xlabel(x_label)
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, (tops[ax] or 1.0) * 1.15)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if "concurrency" in x_label and len(xs_all) > 2:
            ax.set_xscale("log", base=2)
            ax.set_xticks(xs_all, [f"{t:g}" for t in xs_all])
    return _save(fig, path)


def latency_cdf_plot(latencies: dict[str, Sequence[float]], path: Path, slo_p99_s: float | None = None) -> Path:
    """The empirical CDF of request latency, one line per load point."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for label, values in latencies.items():
        values = sorted(values)
        if values:
            fractions = [(i + 1) / len(values) for i in range(len(values))]
            ax.step(values, fractions, where="post", label=f"{label} (n={len(values)})")
    for q in (0.5, 0.99):
        ax.axhline(q, color="grey", linewidth=0.6, linestyle=":")
    if slo_p99_s is not None:
        ax.axvline(slo_p99_s, label=f"SLO p99 {slo_p99_s:g} s", **SLO_STYLE)
    ax.set_title("Latency CDF of successful requests (steady window)")
    ax.set_xlabel("latency (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def time_series_plot(
    bins: Sequence[SeriesBin],
    target_rate: Sequence[tuple[float, float, float]],
    replicas: Sequence[ReplicaSample],
    spans: Sequence[tuple[float, float, str]],
    path: Path,
) -> Path:
    """Rates, latency and (when polled) replicas per deployment on one time axis; ``target_rate`` holds
    (start, end, rate) steps of a shaped schedule, ``spans`` the (start, end, label) of each point's steady
    window."""
    rows = 3 if replicas else 2
    fig, axes = plt.subplots(rows, 1, figsize=(12, 2.85 * rows), sharex=True)
    rate_ax, latency_ax = axes[0], axes[1]
    t = [b.t_s for b in bins]
    if target_rate:
        xs = [x for start, end, _ in target_rate for x in (start, end)]
        ys = [rate for *_, rate in target_rate for _ in (0, 1)]
        rate_ax.plot(xs, ys, color="black", linestyle="--", label="target rate")
    rate_ax.step(t, [b.sent_per_s for b in bins], where="post", label="sent")
    rate_ax.step(t, [b.completed_per_s for b in bins], where="post", label="completed")
    rate_ax.step(t, [b.errors_per_s for b in bins], where="post", label="errors", color="tab:red")
    rate_ax.set_ylabel("requests / s")
    rate_ax.set_title("Offered and served load over time (shaded: steady windows)")
    latency_ax.plot(t, [_nan(b.latency_p50_s) for b in bins], marker=".", label="p50")
    latency_ax.plot(t, [_nan(b.latency_p99_s) for b in bins], marker=".", label="p99")
    latency_ax.set_ylabel("latency (s)")
    latency_ax.set_title("Latency of the requests completing in each interval")
    if replicas:
        _replica_panel(axes[2], replicas)
    axes[-1].set_xlabel("time since the start of the run (s)")
    for ax in axes:
        for i, (start, end, _) in enumerate(spans):
            ax.axvspan(start, end, color="tab:grey" if i % 2 else "tab:blue", alpha=0.06)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    for start, _, label in spans:
        rate_ax.annotate(
            label,
            (start, 0.97),
            xycoords=("data", "axes fraction"),
            fontsize=7,
            va="top",
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.8, "linewidth": 0},
        )
    return _save(fig, path)


def _replica_panel(ax: plt.Axes, replicas: Sequence[ReplicaSample]) -> None:
    """Running (solid) and target (dotted) replicas of each deployment; nested line widths keep equal counts
    of several deployments visible."""
    deployments = sorted({(s.application, s.deployment) for s in replicas})
    for i, (app, name) in enumerate(deployments):
        samples = [s for s in replicas if (s.application, s.deployment) == (app, name)]
        times = [s.t_s for s in samples]
        width = 1.2 + 2.0 * (len(deployments) - 1 - i)
        (line,) = ax.step(
            times, [s.running_replicas for s in samples], where="post", linewidth=width, label=f"{app}/{name} running"
        )
        ax.step(
            times,
            [s.target_replicas for s in samples],
            where="post",
            color=line.get_color(),
            linestyle=":",
            linewidth=width,
            alpha=0.6,
            label=f"{app}/{name} target",
        )
    top = max(max(s.running_replicas, s.target_replicas) for s in replicas)
    ax.set_yticks(range(top + 1))
    ax.set_ylim(0, top + 0.5)
    ax.set_ylabel("replicas")
    ax.set_title("Replicas per deployment (Serve REST API; dotted: the autoscaler's target)")


def cost_latency_plot(
    series: dict[str, Sequence[tuple[float, float, str]]], reference_usd: float, path: Path, utilization: float
) -> Path:
    """Cost per 1,000 images against p99 latency: one line per instance type through its load points, in load
    order, each point given as (p99 latency, cost, short label)."""
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for name, points in series.items():
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
        for latency, cost, label in points:
            ax.annotate(
                label, (latency, cost), textcoords="offset points", xytext=(4, 4), fontsize=7, color=line.get_color()
            )
    ax.axhline(reference_usd, label=f"reference ${reference_usd:.3f} / 1k", **REFERENCE_STYLE)
    ax.margins(x=0.1)  # room for the point labels
    ax.set_title(f"Cost per 1,000 images vs p99 latency ({utilization:.0%} utilization)")
    ax.set_xlabel("p99 latency (s)")
    ax.set_ylabel("USD per 1,000 images (log scale)")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"${v:.3g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)


def offer_bars_plot(panels: dict[str, dict[str, dict[float, float | None]]], reference_usd: float, path: Path) -> Path:
    """Per panel (a measured figure), grouped bars of USD per 1,000 images for each offer (an instance and its
    pricing) at each utilization, on a log scale, with the reference price as a line."""
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 3.6 * len(panels)), squeeze=False)
    for ax, (title, offers) in zip(axes[:, 0], panels.items()):
        names = list(offers)
        utilizations = sorted({u for costs in offers.values() for u in costs})
        width = 0.8 / max(1, len(utilizations))
        for i, u in enumerate(utilizations):
            xs = [j + (i - (len(utilizations) - 1) / 2) * width for j in range(len(names))]
            values = [_nan(offers[name].get(u)) for name in names]
            drawn = ax.bar(xs, values, width=width, label=f"{u:.0%} utilization")
            ax.bar_label(drawn, labels=[f"{v:.2g}" for v in values], fontsize=6)
        ax.axhline(reference_usd, label=f"reference ${reference_usd:.3f} / 1k", **REFERENCE_STYLE)
        _log_dollars(ax)
        ax.set_xticks(range(len(names)), names, rotation=12, ha="right", fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.set_ylabel("USD per 1,000 images (log)")
        ax.legend(fontsize=7, ncol=5, loc="lower center", bbox_to_anchor=(0.5, 1.08), frameon=False)
    return _save(fig, path)


def break_even_plot(lines: dict[str, float], offers: dict[str, float], reference_usd: float, path: Path) -> Path:
    """USD per 1,000 images against a GPU's hourly price (log-log), one line per measured throughput at a
    utilization (given as its images/s x utilization), the reference price as a line and each offer's price a
    GPU-hour as a mark: where a line crosses the reference (a dot) is its break-even hourly price."""
    fig, ax = plt.subplots(figsize=(9, 5))
    crossings = [reference_usd * effective * 3.6 for effective in lines.values()]
    low, high = min([*offers.values(), 1.0]) / 2, max([*offers.values(), *crossings]) * 2
    xs = [low * (high / low) ** (i / 100) for i in range(101)]
    for (name, effective), crossing in zip(lines.items(), crossings):
        (line,) = ax.plot(xs, [x / (effective * 3.6) for x in xs], label=name)
        ax.plot([crossing], [reference_usd], marker="o", color=line.get_color())
        ax.annotate(
            f"${crossing:,.0f}/h",
            (crossing, reference_usd),
            textcoords="offset points",
            xytext=(-10, 6),
            fontsize=6,
            color=line.get_color(),
            rotation=60,
        )
    ax.axhline(reference_usd, label=f"reference ${reference_usd:.3f} / 1k", **REFERENCE_STYLE)
    for name, usd in offers.items():
        ax.axvline(usd, color="grey", linewidth=0.6, linestyle=":")
        ax.annotate(name, (usd, 0.02), xycoords=("data", "axes fraction"), rotation=90, fontsize=6)
    ax.set_xscale("log")
    ax.set_xlim(low, high)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"${v:,.0f}" if v >= 1 else f"${v:.2g}"))
    _log_dollars(ax)
    ax.set_title("Cost per 1,000 images against the GPU's hourly price (dots: break-even with the reference)")
    ax.set_xlabel("USD per GPU-hour (log; dotted: the price table's offers)")
    ax.set_ylabel("USD per 1,000 images (log)")
    ax.legend(fontsize=7)
    return _save(fig, path)


def _log_dollars(ax: plt.Axes) -> None:
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"${v:.3g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.grid(alpha=0.3, which="both")


def engine_plot(series: dict[str, Sequence[tuple[int, float]]], path: Path) -> Path:
    """Engine-only throughput against batch size, one line per engine path."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, points in series.items():
        points = sorted(points)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    batch_sizes = sorted({b for points in series.values() for b, _ in points})
    if len(batch_sizes) > 2:
        ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
    ax.set_title("Engine-only throughput vs batch size")
    ax.set_xlabel("batch size (requests per generate call)")
    ax.set_ylabel("images / s")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(title="engine path")
    return _save(fig, path)


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value

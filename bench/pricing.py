"""The pricing estimate: one row per bench run (one instance type each), from the runs' ``summary.json``.

For each run, the point priced is the fastest one whose error rate is at most ``max_error_rate`` and, with an
SLO, whose p99 latency meets it. Its cost per 1,000 images is computed at 100% utilization and at the target
utilization, and the suggested list price adds the margin on top of the latter. ``python -m bench price``
renders the rows (``bench.price_report.write_price_report``). Pure: summaries in, rows out.

    >>> points = [{"label": "c=1", "images_per_s": 2.0, "latency_p99_s": 0.5, "error_rate": 0.0},
    ...           {"label": "c=8", "images_per_s": 9.0, "latency_p99_s": 3.0, "error_rate": 0.0},
    ...           {"label": "c=64", "images_per_s": 9.5, "latency_p99_s": 9.0, "error_rate": 0.2}]
    >>> best_point(points)["label"], best_point(points, slo_p99_s=1.0)["label"]
    ('c=8', 'c=1')
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from bench.cost import PriceTable, cost_per_1k_images, list_price, parse_nodes


@dataclass
class PriceRow:
    """The price of one run's instance type at its best admissible point."""

    run: str
    kind: str
    point: str
    nodes: str
    bench_host: str
    usd_per_hour: float
    images_per_s: float
    latency_p99_s: float | None
    cost_per_1k_images_usd: float | None
    utilization: float
    cost_per_1k_images_usd_at_utilization: float | None
    margin: float
    list_price_per_1k_images_usd: float | None
    reference_usd_per_1k_images: float
    list_price_vs_reference: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def best_point(
    points: Sequence[dict[str, Any]], slo_p99_s: float | None = None, max_error_rate: float = 0.01
) -> dict[str, Any] | None:
    """The fastest point with errors under ``max_error_rate`` and p99 within the SLO (None if none is)."""
    admissible = [
        p
        for p in points
        if p.get("images_per_s", 0) > 0
        and (p.get("error_rate") or 0.0) <= max_error_rate
        and (slo_p99_s is None or (p.get("latency_p99_s") is not None and p["latency_p99_s"] <= slo_p99_s))
    ]
    return max(admissible, key=lambda p: p["images_per_s"], default=None)


def point_label(point: dict[str, Any]) -> str:
    """A point's name: its load label, or the engine path and batch size."""
    return point.get("label") or f"{point['path']} batch {point['batch_size']}"


def bench_host(hardware: dict[str, Any]) -> str:
    """The machine the bench ran on, in a few words: its GPUs, else its CPU.

    >>> bench_host({"gpus": ["NVIDIA H200"], "cpu_model": "AMD EPYC"}), bench_host({"cpu_model": "AMD EPYC"})
    ('NVIDIA H200', 'AMD EPYC')
    """
    return ", ".join(hardware.get("gpus") or []) or hardware.get("cpu_model") or "unknown"


def price_row(
    run: str,
    summary: dict[str, Any],
    prices: PriceTable,
    *,
    nodes: str | None = None,
    utilization: float,
    margin: float,
    slo_p99_s: float | None = None,
    max_error_rate: float = 0.01,
) -> PriceRow:
    """Price one run; ``nodes`` overrides the node set recorded in its summary."""
    spec = nodes or ",".join(summary.get("nodes") or [])
    if not spec:
        raise ValueError(f"{run}: the run recorded no --nodes; pass --nodes {run}=INSTANCE to price it")
    point = best_point(summary["points"], slo_p99_s, max_error_rate)
    usd_per_hour = prices.usd_per_hour(parse_nodes(spec))
    images_per_s = point["images_per_s"] if point else 0.0
    at_full = cost_per_1k_images(usd_per_hour, images_per_s)
    at_target = cost_per_1k_images(usd_per_hour, images_per_s, utilization)
    suggested = list_price(at_target, margin) if at_target is not None else None
    reference = prices.reference_usd_per_1k
    return PriceRow(
        run=run,
        kind=summary.get("kind", ""),
        point=point_label(point) if point else "none admissible",
        nodes=spec,
        bench_host=bench_host(summary.get("hardware") or {}),
        usd_per_hour=usd_per_hour,
        images_per_s=images_per_s,
        latency_p99_s=point.get("latency_p99_s") if point else None,
        cost_per_1k_images_usd=at_full,
        utilization=utilization,
        cost_per_1k_images_usd_at_utilization=at_target,
        margin=margin,
        list_price_per_1k_images_usd=suggested,
        reference_usd_per_1k_images=reference,
        list_price_vs_reference=suggested / reference if suggested is not None else None,
    )

"""The ``summary.json`` of a load run: provenance, then one entry per load point with its metrics and cost.

``service_summary`` joins what ``bench.load`` measured with ``bench.metrics`` and ``bench.cost``; the result
is plain JSON-ready data (``bench.records.write_json`` writes it). Each point carries at least
``images_per_s``, ``requests``, ``errors``, ``latency_p50_s``, ``latency_p90_s``, ``latency_p99_s``,
``output_tokens_per_s`` and ``cost_per_1k_images_usd`` (at 100% utilization; ``..._at_utilization`` at the
run's ``--utilization``), the latency statistics of ``bench.latency`` under vLLM's names (``mean_ttft_ms``,
``p99_e2el_ms`` ...), and the point's schedule: mode, concurrency or rate, steady window, sent, skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from bench.cost import NodeSpec, PriceTable, cost_per_1k_images
from bench.latency import DEFAULT_PERCENTILES
from bench.load import LoadRun
from bench.metrics import compute_metrics
from serve.provenance import provenance

KIND_SERVICE = "service"
KIND_ENGINE = "engine"


def service_summary(
    run: LoadRun,
    config: dict[str, Any],
    prices: PriceTable,
    nodes: Sequence[NodeSpec],
    utilization: float,
    slo_p99_s: float | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    goodput_slos_ms: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The summary of a load run; cost fields are null when no ``nodes`` were given."""
    usd_per_hour = prices.usd_per_hour(nodes) if nodes else None
    points = []
    for point in run.points:
        records = [r for r in run.records if r.point == point.index]
        metrics = compute_metrics(
            records, point.window_start_s, point.window_end_s, slo_p99_s, percentiles, goodput_slos_ms
        )
        points.append({**asdict(point), **metrics.to_dict(), **costs(usd_per_hour, metrics.images_per_s, utilization)})
    return {
        **provenance(config),
        "kind": KIND_SERVICE,
        "started_at": run.started_at,
        **pricing_header(prices, nodes, usd_per_hour, utilization),
        "replica_poll_failures": run.replica_poll_failures,
        "points": points,
    }


def pricing_header(
    prices: PriceTable, nodes: Sequence[NodeSpec], usd_per_hour: float | None, utilization: float
) -> dict[str, Any]:
    """The fields every summary carries to be priced again later (``python -m bench price``)."""
    return {
        "nodes": [str(node) for node in nodes],
        "usd_per_hour": usd_per_hour,
        "utilization": utilization,
        "reference_usd_per_1k_images": prices.reference_usd_per_1k,
    }


def costs(usd_per_hour: float | None, images_per_s: float, utilization: float) -> dict[str, float | None]:
    """A point's cost per 1,000 images at full and at the given utilization (null without a price).

    >>> costs(3.6, 2.0, 0.5)
    {'cost_per_1k_images_usd': 0.5, 'cost_per_1k_images_usd_at_utilization': 1.0}
    """
    if usd_per_hour is None:
        return {"cost_per_1k_images_usd": None, "cost_per_1k_images_usd_at_utilization": None}
    return {
        "cost_per_1k_images_usd": cost_per_1k_images(usd_per_hour, images_per_s),
        "cost_per_1k_images_usd_at_utilization": cost_per_1k_images(usd_per_hour, images_per_s, utilization),
    }

"""The pricing estimate's report (``python -m bench price``): ``pricing.md``, ``pricing.csv``, ``pricing.png`` and
``cost_vs_latency.png``, from the price rows (``bench.pricing``) and the runs' summaries."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bench import plots
from bench.cost import cost_per_1k_images
from bench.pricing import PriceRow
from bench.tables import markdown_table, plot_label


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
            (p["latency_p99_s"], cost_per_1k_images(row.usd_per_hour, p["images_per_s"], utilization), plot_label(p))
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

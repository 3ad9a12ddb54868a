"""The report of a batch run (``kosmos2-serve batch``), from its ``summary.json``: what a ``bench run`` report gives
for one load point, throughput, tokens, errors, CPU, memory and, priced on a node set, the cost per 1,000 images.

    python -m bench report results.jsonl.batch --nodes p5en.48xlarge/gpu,m7g.large*4 --utilization 0.7

``report.md`` and ``summary.csv`` land beside the summary; ``python -m bench price`` prices the same summary on
every instance of its GPU.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from bench.cost import DEFAULT_PRICES, load_prices, parse_nodes
from bench.records import read_json
from bench.summary import costs
from bench.tables import markdown_table, provenance_lines

COLUMNS = {
    "requests": "rows",
    "answered": "answers",
    "errors": "errors",
    "skipped_done": "done before",
    "wall_s": "wall (s)",
    "images_per_s": "images/s",
    "wall_images_per_s": "images/s, whole run",
    "output_tokens_per_s": "output tok/s",
    "completion_tokens_mean": "tokens/answer",
    "cpu_ms_per_request": "CPU ms/row",
    "cost_per_1k_images_usd": "$/1k @100%",
    "cost_per_1k_images_usd_at_utilization": "$/1k @utilization",
}


def write_batch_report(run_dir: Path, nodes: str | None = None, utilization: float = 1.0) -> Path:
    """``summary.csv`` and ``report.md`` of a batch run's state folder; priced on ``nodes`` where given."""
    run_dir = Path(run_dir)
    summary = read_json(run_dir / "summary.json")
    point = dict(summary["points"][0])
    prices = load_prices(DEFAULT_PRICES)
    usd_per_hour = prices.usd_per_hour(parse_nodes(nodes)) if nodes else None
    point |= costs(usd_per_hour, point["images_per_s"], utilization)
    frame = pd.DataFrame([point])
    frame.to_csv(run_dir / "summary.csv", index=False)
    job = summary["config"]["job"]
    memory = summary.get("memory_peak") or {}
    priced = (
        f"Priced on `{nodes}` at ${usd_per_hour:.4g}/h (`{DEFAULT_PRICES.name}`), utilization {utilization:.0%}; the "
        f"reference is ${prices.reference_usd_per_1k:.3f} per 1,000 images."
        if nodes
        else "Not priced: give `--nodes`, or run `python -m bench price` on this folder."
    )
    lines = [
        "# Kosmos-2 batch run",
        "",
        f"`{job['source']}` to `{job['output']}` ({'images' if job['images'] else 'a batch file'}), started "
        f"{summary['started_at']}. images/s counts the answers over the span from the engines taking the first "
        "request to giving the last answer; the whole run's figure counts every row over its wall time.",
        "",
        *provenance_lines(summary),
        "",
        markdown_table(frame[[c for c in COLUMNS if c in frame]].rename(columns=COLUMNS)),
        "",
        priced,
        "",
        "Peak memory: "
        + ", ".join(
            f"{k.removesuffix('_mib').replace('_', ' ')} {v} MiB" for k, v in memory.items() if k != "processes"
        )
        + f", over {memory.get('processes')} processes.",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path

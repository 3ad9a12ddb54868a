"""What every bench report shares: Markdown tables from pandas frames, the provenance lines, and plot labels."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd


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


def provenance_lines(summary: dict[str, Any]) -> list[str]:
    """Where a summary came from, as Markdown list items: the commit, the bench host and the versions."""
    hardware = summary.get("hardware", {})
    versions = ", ".join(f"{k} {v}" for k, v in summary.get("versions", {}).items() if v)
    return [
        f"- commit `{summary.get('git_commit') or 'unknown'}`, schema version {summary.get('schema_version')}",
        f"- bench host: {hardware.get('cpu_model')}, {hardware.get('cpu_cores')} cores, "
        f"{hardware.get('memory_gib')} GiB, GPUs: {', '.join(hardware.get('gpus') or []) or 'none'}",
        f"- versions: {versions}",
    ]


def plot_label(point: dict[str, Any]) -> str:
    """A point's label for a plot: c=4, 2/s, b=32.

    >>> plot_label({"mode": "closed", "concurrency": 4}), plot_label({"mode": "open", "rate": 2.0})
    ('c=4', '2/s')
    >>> plot_label({"batch_size": 8})
    'b=8'
    """
    if "batch_size" in point:
        return f"b={point['batch_size']}"
    if point.get("mode") == "closed":
        return f"c={point['concurrency']}"
    return "shape" if point.get("mode") == "shape" else f"{point['rate']:g}/s"

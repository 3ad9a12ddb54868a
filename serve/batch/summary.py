"""A batch run's ``summary.json``: the bench's provenance header, then one point with its throughput, tokens, errors,
CPU and memory, so that ``python -m bench price`` prices it beside the service's and the engine's runs (labelled
``batch``).

``images_per_s`` counts the answers over the span from the engines taking the run's first request to their last
answer (the engines' start and the last writes left out, as a load run's steady window leaves out its warm-up);
``wall_images_per_s`` counts every row over the whole run. ``cpu_ms_per_request`` is the CPU time of the batch's
processes (the driver and the Ray it started, see ``serve.batch.usage``) a row, where that was measured.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from serve.batch.output import PartStats
from serve.provenance import provenance

KIND_BATCH = "batch"


def batch_summary(
    config: dict[str, Any],
    written: Sequence[PartStats],
    skipped: int,
    wall_s: float,
    usage: dict[str, float | None],
    measured_cpu: bool,
) -> dict[str, Any]:
    """The summary of one run: ``written`` are its write tasks' stats, ``skipped`` the rows done by earlier runs."""
    rows = sum(s.rows for s in written)
    answered = sum(s.answered for s in written)
    firsts = [s.first_at for s in written if s.first_at is not None]
    lasts = [s.last_at for s in written if s.last_at is not None]
    span = max(lasts) - min(firsts) if firsts else 0.0
    steady = answered / span if answered > 1 and span > 0 else None
    completion = sum(s.completion_tokens for s in written)
    cpu_s = usage.get("cpu_s")
    point = {
        "label": "batch",
        "mode": "batch",
        "requests": rows,
        "answered": answered,
        "errors": rows - answered,
        "error_rate": (rows - answered) / rows if rows else 0.0,
        "skipped_done": skipped,
        "wall_s": round(wall_s, 3),
        "steady_s": round(span, 3),
        "images_per_s": steady if steady is not None else (answered / wall_s if wall_s else 0.0),
        "wall_images_per_s": rows / wall_s if wall_s else 0.0,
        "output_tokens_per_s": completion / span if span > 0 else None,
        "prompt_tokens_mean": sum(s.prompt_tokens for s in written) / answered if answered else None,
        "completion_tokens_mean": completion / answered if answered else None,
        "cpu_ms_per_request": round(1e3 * cpu_s / rows, 3) if measured_cpu and cpu_s is not None and rows else None,
    }
    memory = {name: value for name, value in usage.items() if name != "cpu_s"}
    return {
        **provenance(config),
        "kind": KIND_BATCH,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(time.time() - wall_s)),
        "points": [point],
        "memory_peak": memory,
    }

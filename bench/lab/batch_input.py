"""The batch mode's step of the performance run: a table of images of the performance workload, and the command
that runs it through ``python -m serve batch``.

The table (``batch-input/images.jsonl``) names ``count`` rows cycling over the workload's pool of distinct JPEGs
(written once beside it), so that a large batch costs little disk. The run's summary lands in ``batch/`` (what
``python -m bench price`` reads), its Parquet output in a temporary folder that the next run replaces.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

from bench.workload import WorkloadConfig, build_workload


def write_table(folder: Path, count: int, max_tokens: int) -> Path:
    """``count`` rows of the workload's images (written to ``folder``); returns the table's path."""
    folder.mkdir(parents=True, exist_ok=True)
    config = WorkloadConfig(
        resolutions={"640x480": 1.0}, formats={"jpeg": 1.0}, tasks={"caption": 1.0}, max_tokens=max_tokens
    )
    pool = build_workload(config)
    for item in pool:
        (folder / f"{item.index}.jpeg").write_bytes(item.image)
    table = folder / "images.jsonl"
    with table.open("w") as out:
        for n in range(count):
            out.write(json.dumps({"id": f"image-{n:08d}", "image": f"{n % len(pool)}.jpeg"}) + "\n")
    return table


def batch_command(out: Path, model: list[str], config: str, count: int, max_tokens: int) -> list[str]:
    """The command that captions ``count`` images of the workload with exactly ``max_tokens`` new tokens and
    writes its summary to ``out/batch/summary.json``."""
    table = write_table(out / "batch-input", count, max_tokens)
    output = Path(tempfile.gettempdir()) / "kosmos2-perf-batch"
    shutil.rmtree(output, ignore_errors=True)
    return [
        sys.executable,
        "-m",
        "serve",
        "batch",
        *model,
        "--config",
        config,
        "--images",
        str(table),
        "-o",
        str(output),
        "--task",
        "caption",
        "--max-tokens",
        str(max_tokens),
        "--ignore-eos",
        "--summary",
        str(out / "batch" / "summary.json"),
        "--no-progress",
    ]

"""Run a predictor over a dataset, score every expression, and write the results (resumable).

``evaluate(examples, predictor, out)`` appends one line per expression to ``OUT/predictions.jsonl`` as answers
arrive, then writes ``OUT/summary.json``, ``OUT/report.md`` and ``OUT/examples.png``. Run it again with the same
``OUT`` and it predicts only what is missing or failed (a partial last line from a crash is dropped), so an
interrupted evaluation costs nothing twice. Scores are recomputed from the stored entities every time, with
``eval.refexp``, against the annotations of this run. The command line is ``python -m eval run`` (``eval/__main__.py``).
"""

from __future__ import annotations

import asyncio
import json
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from tqdm import tqdm

from eval.datasets import PAPER_SPLIT_BY, RefExample, check_unique
from eval.examples import draw_examples
from eval.predictors import Predictor
from eval.records import SCHEMA_VERSION, PredictionRecord, RunError, read_records
from eval.refexp import Tally, tally
from eval.report import PAPER_COLUMNS, render_report

PACKAGES = ("torch", "transformers", "httpx", "numpy", "pillow")


async def predict_all(
    examples: Sequence[RefExample], predictor: Predictor, path: Path, progress: bool = True
) -> tuple[dict[str, PredictionRecord], int]:
    """Predict every example without a finished record in ``path``; returns all records and how many are new."""
    records = read_records(path, predictor.name, {e.id: e for e in examples})
    pending = [e for e in examples if e.id not in records]
    batches = [pending[i : i + predictor.batch_size] for i in range(0, len(pending), predictor.batch_size)]
    gate = asyncio.Semaphore(predictor.concurrency)
    bar = tqdm(total=len(examples), initial=len(examples) - len(pending), unit="expr", disable=not progress)
    with path.open("a", encoding="utf-8") as sink, bar:

        async def work(batch: list[RefExample]) -> None:
            async with gate:
                predictions = await predictor.predict(batch)
            for example, prediction in zip(batch, predictions):
                record = PredictionRecord.build(example, prediction, predictor.name)
                sink.write(record.to_json() + "\n")
                records[example.id] = record
            sink.flush()
            bar.update(len(batch))

        tasks = [asyncio.ensure_future(work(batch)) for batch in batches]
        try:
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
    return records, len(pending)


async def evaluate(
    examples: Sequence[RefExample],
    predictor: Predictor,
    out: str | Path,
    config: dict[str, Any] | None = None,
    progress: bool = True,
    example_count: int = 16,
) -> dict[str, Any]:
    """Predict, score and write all outputs to ``out``; returns the summary (also in ``summary.json``)."""
    if not examples:
        raise RunError("no expressions to evaluate: check the annotation files and --split")
    check_unique(examples)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    async with predictor:
        records, new = await predict_all(examples, predictor, out / "predictions.jsonl", progress)
    wall = time.perf_counter() - started
    ordered = [records[e.id] for e in examples]
    summary = summarize(ordered, {**(config or {}), **predictor.describe()}, examples)
    summary["timing"] = {
        "wall_s": round(wall, 3),
        "predicted": new,
        "expressions_per_s": round(new / wall, 3) if wall > 0 else None,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "report.md").write_text(render_report(summary), encoding="utf-8")
    draw_examples(examples, ordered, out / "examples.png", count=example_count)
    return summary


def summarize(
    records: Sequence[PredictionRecord], config: dict[str, Any], examples: Sequence[RefExample] = ()
) -> dict[str, Any]:
    """Overall and per-split accuracy (with 95% Wilson intervals) of scored records, what each split was read
    from and whether it may stand beside the paper's column of that name, the run's config and versions.

    ``examples`` (the records' examples, in any order) give each split's sources, box formats and caveats.
    """
    scores = [r.score() for r in records]
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault((r.dataset, r.split), []).append(i)
    origins: dict[tuple[str, str], list[RefExample]] = {}
    for example in examples:
        origins.setdefault((example.dataset, example.split), []).append(example)
    per_split = [
        {
            "dataset": dataset,
            "split": split,
            **_origin(dataset, split, origins.get((dataset, split), [])),
            **_tally_dict(tally(scores[i] for i in members), records, members),
        }
        for (dataset, split), members in groups.items()
    ]
    errors = sum(r.error is not None for r in records)
    return {
        "schema_version": SCHEMA_VERSION,
        **_tally_dict(tally(scores), records, range(len(records))),
        "complete": errors == 0,
        "dtype": config.get("dtype"),
        "bbox_formats": sorted({e.bbox_format for e in examples}),
        "caveats": sorted({e.caveat for e in examples if e.caveat}),
        "per_split": per_split,
        "config": config,
        "versions": versions(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _origin(dataset: str, split: str, examples: Sequence[RefExample]) -> dict[str, Any]:
    """Where a split's examples came from, its partition (``unc``, ``umd``, ``google``), and whether it is the
    paper's split of that name."""
    caveats = sorted({e.caveat for e in examples if e.caveat})
    name, _, suffix = dataset.partition("-")
    return {
        "partition": (suffix or PAPER_SPLIT_BY[name]) if name in PAPER_SPLIT_BY else None,
        "sources": sorted({e.source for e in examples}),
        "bbox_formats": sorted({e.bbox_format for e in examples}),
        "caveat": "; ".join(caveats) or None,
        "paper_column": any((dataset, split) == (d, s) for d, s, _ in PAPER_COLUMNS) and not caveats,
    }


def versions() -> dict[str, Any]:
    """Python, platform, the installed versions of the packages that matter, and this checkout's commit."""
    installed = {}
    for name in PACKAGES:
        try:
            installed[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed[name] = None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": installed,
        "git_commit": _git_commit(),
    }


def _tally_dict(t: Tally, records: Sequence[PredictionRecord], members: Sequence[int]) -> dict[str, Any]:
    return {**t.as_dict(), "errors": sum(records[i].error is not None for i in members)}


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")

"""Where a service's requests spent their time, from the Ingress replicas' request log lines.

Every request leaves one JSON line in its Ingress replica's log (``serve.app.ingress``): its latency at the Ingress
and, for a non-streaming answer, the seconds from the Ingress's hand-over to the Preprocessor's start
(``queued_s``: Serve's routing and queues), preparing the image and prompt (``prepare_s``) and awaiting the
Generator (``generate_s``: the hop, its queues and the engine). The rest is the Ingress's own work and the
answer's way back. This gives their medians over windows of the run, by the time each request ended:

    python -m bench.lab.request_log /tmp/ray/session_latest/logs/serve --window 5

    >>> record = parse('INFO 2026-11-26 17:51:25,629 kosmos2_Ingress ab12 id -- {"event": "request", "status": 200}')
    >>> record["status"], round(record["t"] % 60, 3)
    (200, 25.629)
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

PARTS = ("queued_s", "prepare_s", "generate_s")


def parse(line: str) -> dict[str, Any] | None:
    """The request record of one log line, with ``t``, the line's time in seconds; ``None`` for other lines."""
    if '"event": "request"' not in line:
        return None
    _, day, clock, _ = line.split(" ", 3)
    record = json.loads(line[line.index("{") :])
    record["t"] = datetime.strptime(f"{day} {clock}", "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return record


def read(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every request record in the given logs, in the order the requests ended."""
    records = []
    for path in paths:
        with path.open(errors="replace") as lines:
            records += [record for line in lines if (record := parse(line)) is not None]
    return sorted(records, key=lambda record: record["t"])


def windows(records: list[dict[str, Any]], seconds: float) -> list[dict[str, float]]:
    """Per window of ``seconds`` with answered requests: its start (from the first request's end), requests
    ended a second, and the medians of the latency, of its timed parts and of the rest, over the successful
    non-streaming ones."""
    if not records:
        return []
    start = records[0]["t"]
    groups: dict[int, list[dict[str, Any]]] = {}
    for record in records:
        groups.setdefault(int((record["t"] - start) // seconds), []).append(record)
    rows = []
    for index, group in sorted(groups.items()):
        timed = [r for r in group if r.get("status") == 200 and all(part in r for part in PARTS)]
        if not timed:
            continue
        row = {"start_s": index * seconds, "requests_per_s": len(group) / seconds}
        row["latency_s"] = statistics.median(r["latency_s"] for r in timed)
        for part in PARTS:
            row[part] = statistics.median(r[part] for r in timed)
        row["rest_s"] = statistics.median(r["latency_s"] - sum(r[part] for part in PARTS) for r in timed)
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, float]]) -> str:
    columns = ["start_s", "requests_per_s", "latency_s", *PARTS, "rest_s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:.0f}" if c == "start_s" else f"{row[c]:.3f}" for c in columns) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lab.request_log", description=__doc__.split("\n\n")[0])
    parser.add_argument("logs", type=Path, help="a folder of Serve replica logs (the Ingress replicas' are read)")
    parser.add_argument("--window", type=float, default=5.0, help="seconds a row (%(default)s)")
    parser.add_argument("--out", type=Path, help="write the table here too")
    args = parser.parse_args(argv)
    table = markdown(windows(read(sorted(args.logs.glob("replica_*Ingress*.log"))), args.window))
    print(table, end="")
    if args.out:
        args.out.write_text(table)


if __name__ == "__main__":
    main()

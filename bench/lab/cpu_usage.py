"""CPU time of the service's processes on this machine, by role, from ``/proc`` (Linux).

``bench.lab.perf_run`` takes a snapshot before and after a load point and divides the difference by the requests
served, which says where each request's CPU goes: HAProxy or Serve's proxy, each deployment's replicas, Ray's
own processes, the Generator's engine process, and the load generator.

    >>> role("ray::ServeReplica:kosmos2:Preprocessor", "ray::ServeRepli")
    'Preprocessor'
    >>> role("/usr/bin/haproxy -f /tmp/kosmos2-haproxy-1/haproxy.cfg", "haproxy")
    'haproxy'
    >>> role("/venv/bin/python -m serve.engine.process 14", "python")
    'engine process'
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

ROLES = {
    "serve.engine.process": "engine process",
    "ServeController": "controller",
    "ProxyActor": "serve proxy",
    "HAProxy": "haproxy manager",
    "gcs_server": "ray gcs",
    "raylet": "raylet",
    "bench run": "load generator",
    "serve run": "driver",
}


def role(command: str, name: str) -> str | None:
    """The role of a process from its command line and name; ``None`` for processes not the service's."""
    if "ServeReplica:" in command:
        return command.split("ServeReplica:", 1)[1].split()[0].split(":")[-1]
    if name == "haproxy" or "/haproxy " in command:
        return "haproxy"
    for marker, label in ROLES.items():
        if marker in command or marker == name:
            return label
    if command.startswith("ray::") or "ray/_private" in command or "default_worker" in command:
        return "ray other"
    return None


def processes() -> Iterator[tuple[int, str, list[str]]]:
    """The pid, role and ``/proc/PID/stat`` fields (after the name) of each of the service's processes."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            label = role(command, (entry / "comm").read_text().strip())
            if label is None:
                continue
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        yield int(entry.name), label, fields


def snapshot() -> dict[str, float]:
    """CPU seconds (user and system) used so far by each role's processes."""
    ticks = os.sysconf("SC_CLK_TCK")
    used: dict[str, float] = defaultdict(float)
    for _, label, fields in processes():
        used[label] += (int(fields[11]) + int(fields[12])) / ticks
    return dict(used)


def one_of_each(roles: Iterable[str]) -> dict[str, int]:
    """A pid for each of ``roles`` that has a running process (the lowest pid)."""
    wanted = set(roles)
    found: dict[str, int] = {}
    for pid, label, _ in sorted(processes()):
        if label in wanted:
            found.setdefault(label, pid)
    return found


def per_request_ms(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """CPU milliseconds per request by role between two snapshots, the largest first, with their total.

    >>> per_request_ms({"Generator": 1.0}, {"Generator": 3.0, "haproxy": 0.5}, 1000)
    {'Generator': 2.0, 'haproxy': 0.5, 'total': 2.5}
    """
    spent = {label: after[label] - before.get(label, 0.0) for label in after}
    rows = {label: round(1e3 * seconds / max(requests, 1), 3) for label, seconds in spent.items() if seconds > 0}
    ordered = dict(sorted(rows.items(), key=lambda item: -item[1]))
    return {**ordered, "total": round(sum(ordered.values()), 3)}

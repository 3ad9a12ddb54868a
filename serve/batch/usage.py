"""CPU time and memory of a batch's processes, from ``/proc`` (Linux): the driver and every process under it.

A batch that starts its own Ray on this machine is the parent of all of Ray's processes (GCS, raylet, the workers
that read, prepare, generate, finish and write, the engine processes), so the driver's process tree is the whole
batch. :class:`TreeUsage` samples the tree every half second: its memory (the driver's RSS, the largest worker's
RSS, and the proportional set size of the whole tree, which counts the object store's shared pages once) and
each process's own CPU time, keyed by its pid and start time. A process's CPU counts as last sampled, less what
it had at the start: one that exits loses at most the time since its last sample, and none is counted twice
(children's reaped time, which Ray's and the engines' exits make unreliable, is not used). Where there is no
``/proc``, the figures are null.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from pathlib import Path

PROC = Path("/proc")
TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _stat(pid: int) -> tuple[str, list[str]] | None:
    """The command name of ``pid`` and the fields of its ``stat`` after it (state, ppid, ...)."""
    try:
        head, rest = (PROC / str(pid) / "stat").read_text().rsplit(")", 1)
    except (OSError, ValueError):
        return None
    return head.split("(", 1)[1], rest.split()


def _pids() -> list[int]:
    return [int(entry.name) for entry in PROC.iterdir() if entry.name.isdigit()]


def tree(root: int) -> dict[int, tuple[str, list[str]]]:
    """``root`` and its descendants now, each with its command name and ``stat`` fields."""
    stats = {pid: found for pid in _pids() if (found := _stat(pid)) is not None}
    children: dict[int, list[int]] = defaultdict(list)
    for pid, (_, fields) in stats.items():
        children[int(fields[1])].append(pid)
    found, frontier = [root], [root]
    while frontier:
        frontier = [child for pid in frontier for child in children.get(pid, ())]
        found += frontier
    return {pid: stats[pid] for pid in found if pid in stats}


def cpu_ticks(stats: dict[int, tuple[str, list[str]]]) -> dict[tuple[int, int], int]:
    """Each process's own user and system time (clock ticks), keyed by its pid and start time."""
    return {(pid, int(fields[19])): int(fields[11]) + int(fields[12]) for pid, (_, fields) in stats.items()}


def _kib(pid: int, name: str, file: str) -> int:
    try:
        for line in (PROC / str(pid) / file).read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class TreeUsage:
    """Samples the memory of this process's tree every ``every_s`` until :meth:`stop`, which returns the peaks and
    the CPU seconds spent meanwhile."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.root = os.getpid()
        self.available = PROC.is_dir()
        self.every_s = every_s
        self.peaks = {"driver_rss_mib": 0.0, "largest_worker_rss_mib": 0.0, "tree_pss_mib": 0.0, "processes": 0}
        self._stopped = threading.Event()
        self._cpu_start = cpu_ticks(tree(self.root)) if self.available else {}
        self._cpu_last = dict(self._cpu_start)
        self._thread = threading.Thread(target=self._sample_until_stopped, name="batch-usage", daemon=True)
        if self.available:
            self._thread.start()

    def _sample_until_stopped(self) -> None:
        while not self._stopped.wait(self.every_s):
            self.sample()

    def includes(self, command: str) -> bool:
        """Whether a process named ``command`` runs in the tree now (``raylet``: this batch started its Ray)."""
        return self.available and any(name == command for name, _ in tree(self.root).values())

    def sample(self) -> None:
        pids = tree(self.root)
        self._cpu_last.update(cpu_ticks(pids))
        rss = {pid: _kib(pid, "VmRSS", "status") / 1024 for pid in pids}
        pss = sum(_kib(pid, "Pss", "smaps_rollup") for pid in pids) / 1024
        workers = [value for pid, value in rss.items() if pid != self.root]
        now = {
            "driver_rss_mib": rss.get(self.root, 0.0),
            "largest_worker_rss_mib": max(workers, default=0.0),
            "tree_pss_mib": pss,
            "processes": len(pids),
        }
        self.peaks = {name: max(self.peaks[name], value) for name, value in now.items()}

    def stop(self) -> dict[str, float | None]:
        """Peak memory (MiB) and CPU seconds of the tree since the start; null figures without ``/proc``."""
        if not self.available:
            return {name: None for name in (*self.peaks, "cpu_s")}
        self._stopped.set()
        self._thread.join()
        self.sample()
        cpu = sum(ticks - self._cpu_start.get(key, 0) for key, ticks in self._cpu_last.items()) / TICKS
        return {**{name: round(value, 1) for name, value in self.peaks.items()}, "cpu_s": round(cpu, 2)}

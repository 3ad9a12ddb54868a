"""One instance of the service on this machine: its state folder, the lock that says it is alive, its
processes, so that a stop leaves nothing behind and a start cleans up after an instance that was killed, and
the checks of its addresses and ports.

The state folder is named for the port the instance serves (``<tmp>/kosmos2-8000``: short, as HAProxy's unix
sockets live below it and their paths may not exceed 97 bytes). It holds:

- ``lock``: locked (``flock``) by the launcher for as long as it lives, with its pid inside. The kernel drops the
  lock when the launcher dies, however it dies, so a folder whose lock can be taken belongs to no live
  instance;
- ``processes``: the pid and start time of every process of the instance, rewritten every few seconds while it
  runs (Ray's processes and everything below them: agents, workers, HAProxy, engine processes);
- HAProxy's files (its config, admin socket, server state), named in its command line, and ``draining``, the
  flag the Ingress replicas read (``serve.app.ingress``).

A process is the instance's when it is listed in ``processes`` with the same start time (a pid the system has
given to another program since does not match), or when its command line names a file in the folder. Nothing
else is ever signalled.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import shutil
import signal
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import IO

import psutil

PREFIX = "kosmos2-"
INSTANCE_DIR_ENV = "KOSMOS_INSTANCE_DIR"
"""Set for the processes of an instance (Ray's environment): the instance's state folder."""
DRAIN_FLAG = "draining"
"""The file in that folder whose presence tells the Ingress replicas to refuse new requests: a stop is draining."""
TERM_GRACE_S = 3.0
"""How long a process of the instance has to exit after SIGTERM before it gets SIGKILL."""


class InstanceBusy(RuntimeError):
    """Another live instance serves this host and port."""


def state_folder(port: int) -> Path:
    """The state folder of the instance serving ``port`` on this machine."""
    return Path(tempfile.gettempdir()) / f"{PREFIX}{port}"


class Instance:
    """The state folder of a live instance, locked by this process; ``claim`` makes one."""

    def __init__(self, folder: Path, lock: IO[str]) -> None:
        self.folder = folder
        self._lock = lock
        self._known: dict[int, float] = {}  # pid -> start time, of every process of the instance seen so far
        self._roots: list[psutil.Process] = []

    @classmethod
    def claim(cls, host: str, port: int) -> tuple[Instance, int]:
        """Lock the folder for ``host:port``, ending what a dead instance left there; returns the instance and
        how many of the dead instance's processes were ended. Raises ``InstanceBusy`` if a live one holds it."""
        folder = state_folder(port)
        folder.mkdir(mode=0o700, exist_ok=True)
        lock = open(folder / "lock", "a+")  # noqa: SIM115 - held open for the instance's life
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            owner = lock.read().strip() or "unknown"
            lock.close()
            raise InstanceBusy(f"another instance (pid {owner}) serves {host}:{port}; stop it first") from None
        ended = end_processes(leftovers(folder))
        for entry in folder.iterdir():
            if entry.name != "lock":
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        return cls(folder, lock), ended

    @property
    def drain_flag(self) -> Path:
        return self.folder / DRAIN_FLAG

    def adopt(self, roots: Iterable[psutil.Process]) -> None:
        """Take ``roots`` (the processes Ray started from this one) and everything below them as the instance's."""
        self._roots = list(roots)
        self.record()

    def record(self) -> None:
        """Note the processes of the instance now, in memory and in the folder (read by the next start if this
        launcher is killed)."""
        for process in self._roots:
            for member in (process, *_children(process)):
                with contextlib.suppress(psutil.Error):
                    self._known.setdefault(member.pid, member.create_time())
        listing = "".join(f"{pid} {started}\n" for pid, started in self._known.items())
        temporary = self.folder / "processes.tmp"
        temporary.write_text(listing)
        temporary.replace(self.folder / "processes")

    def processes(self) -> list[psutil.Process]:
        """The processes of the instance that are alive: those recorded, and those naming a file of the folder."""
        self.record()
        return _alive(self._known) + _naming(self.folder, exclude=set(self._known))

    def release(self) -> int:
        """End whatever of the instance is still running, remove the folder and drop the lock; returns how many
        processes had to be ended here."""
        ended = end_processes(self.processes())
        shutil.rmtree(self.folder, ignore_errors=True)
        self._lock.close()
        return ended


def leftovers(folder: Path) -> list[psutil.Process]:
    """The live processes of a dead instance whose folder is ``folder``."""
    recorded: dict[int, float] = {}
    with contextlib.suppress(FileNotFoundError):
        for line in (folder / "processes").read_text().splitlines():
            pid, started = line.split()
            recorded[int(pid)] = float(started)
    return _alive(recorded) + _naming(folder, exclude=set(recorded))


def end_processes(processes: list[psutil.Process]) -> int:
    """SIGTERM, then SIGKILL for those still alive ``TERM_GRACE_S`` later; returns how many were signalled."""
    processes = [p for p in processes if p.pid != os.getpid()]
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(processes, timeout=TERM_GRACE_S)
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(alive, timeout=TERM_GRACE_S)
    return len(processes)


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def _alive(recorded: dict[int, float]) -> list[psutil.Process]:
    """The recorded processes still running, checked by start time so that a reused pid is left alone."""
    found = []
    for pid, started in recorded.items():
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if abs(process.create_time() - started) < 0.01 and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
    return found


def _naming(folder: Path, exclude: set[int]) -> list[psutil.Process]:
    """Processes whose command line names a file in ``folder`` (HAProxy: ``-f <folder>/.../haproxy.cfg``)."""
    prefix = f"{folder}{os.sep}"
    found = []
    for process in psutil.process_iter(["cmdline"]):
        arguments = process.info["cmdline"] or []
        if process.pid not in exclude and any(argument.startswith(prefix) for argument in arguments):
            found.append(process)
    return found


def can_listen(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now (past the TIME_WAIT of closed connections)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
            probe.listen()
        except OSError:
            return False
        return True


def free_port(host: str) -> int:
    """A port nothing listens on at ``host`` now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: what it resolves to
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False

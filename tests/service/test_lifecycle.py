"""``python -m serve run`` as a user runs it, in a subprocess with the tiny model on free ports of 127.0.0.1 and
Ray's CPUs set to 2: the default config starts, two instances run side by side, nothing listens beyond
loopback, a SIGTERM under load loses no request and leaves nothing behind, and a start after a SIGKILL cleans up
and serves. Every launcher is killed with its processes at the end, whatever happens."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest

from serve.app.instance import state_folder
from tests.conftest import free_port
from tests.helpers import body

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
READY_S = 300
"""How long a start may take on a loaded 2-core machine."""
STOP_S = 90
"""A stop's bound with the drain these tests ask for (5 s): see docs/reliability.md, "Start and stop"."""
LOOPBACK = {"127.0.0.1", "::1", "::ffff:127.0.0.1"}


class Launched:
    """One ``python -m serve run`` in its own session, its output collected as it comes."""

    def __init__(self, model: Path, port: int, *args: str) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "serve", "run", "--model", str(model), "--port", str(port)]
        command += ["--num-cpus", "2", "--drain-timeout", "5", *args]
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        self.lines: list[str] = []
        self.seen: dict[int, psutil.Process] = {}  # every process of the instance seen, by pid
        self.signalled = 0.0
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_S
        while not any("is ready at" in line for line in self.lines):
            assert self.process.poll() is None, f"exited with {self.process.returncode}:\n{self.output[-3000:]}"
            assert time.monotonic() < deadline, f"not ready after {READY_S} s:\n{self.output[-3000:]}"
            time.sleep(0.5)
        self.processes()

    def processes(self) -> list[psutil.Process]:
        """The launcher and everything below it now (also noted in ``seen``)."""
        root = psutil.Process(self.process.pid)
        found = [root, *root.children(recursive=True)]
        self.seen.update((process.pid, process) for process in found)
        return found

    def listening(self) -> list[tuple[str, str, int]]:
        """(process name, address, port) of every listening socket of the instance."""
        found = []
        for process in self.processes():
            with contextlib.suppress(psutil.Error):
                for connection in process.net_connections(kind="inet"):
                    if connection.status == psutil.CONN_LISTEN:
                        found.append((process.name(), connection.laddr.ip, connection.laddr.port))
        return found

    def survivors(self, naming_its_folder: bool = True) -> list[psutil.Process]:
        """Processes of the instance still running: those seen, and any naming its state folder (HAProxy)."""
        alive = []
        for process in self.seen.values():
            with contextlib.suppress(psutil.Error):
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(process)
        folder = f"{state_folder(self.port)}{os.sep}"
        for process in psutil.process_iter(["cmdline"]) if naming_its_folder else []:
            if any(argument.startswith(folder) for argument in process.info["cmdline"] or []):
                alive.append(process)
        return alive

    def terminate(self) -> None:
        """SIGTERM to the launcher, its processes noted first."""
        self.processes()
        self.signalled = time.monotonic()
        self.process.send_signal(signal.SIGTERM)

    def wait_exit(self) -> float:
        """Wait for the launcher to exit, with 0; returns the seconds since the SIGTERM."""
        assert self.process.wait(timeout=STOP_S) == 0, self.output[-3000:]
        return time.monotonic() - self.signalled

    def stop(self) -> float:
        """SIGTERM; returns the seconds until the launcher exited (with 0)."""
        self.terminate()
        return self.wait_exit()

    def kill(self) -> None:
        """End the launcher's session, every process of the instance seen and its state folder: the tests' own
        cleanup, whatever happened."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        for process in self.survivors():
            with contextlib.suppress(psutil.Error):
                process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)
        shutil.rmtree(state_folder(self.port), ignore_errors=True)


@contextlib.contextmanager
def launched(model: Path, *args: str, port: int | None = None):
    instance = Launched(model, port or free_port(), *args)
    try:
        yield instance
    finally:
        instance.kill()


def port_is_free(port: int) -> bool:
    """Whether a server can listen on ``port`` (as servers do, past the closed connections' TIME_WAIT)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
            probe.listen()
        except OSError:
            return False
        return True


def served(url: str) -> dict:
    response = httpx.post(f"{url}/v1/chat/completions", json=body(), timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def assert_left_nothing(instance: Launched) -> None:
    assert instance.survivors() == []
    assert port_is_free(instance.port)
    assert not state_folder(instance.port).exists()


@pytest.fixture(scope="module")
def pair(tiny_dir):
    """Two instances started side by side: the default config (no --config), and configs/local.yaml."""
    with launched(tiny_dir) as default, launched(tiny_dir, "--config", str(ROOT / "configs/local.yaml")) as local:
        default.wait_ready()
        local.wait_ready()
        yield default, local
        for instance in (default, local):
            instance.terminate()
        for instance in (default, local):
            instance.wait_exit()
            assert_left_nothing(instance)


def test_the_default_config_serves_on_two_cpus(pair):
    default, _ = pair
    note = next(line for line in default.lines if line.startswith("note: the replicas ask for"))
    assert "2.5 CPUs and Ray has 2" in note and "--config" in note  # said in one line
    assert served(default.url)["choices"][0]["finish_reason"] in ("stop", "length")
    assert httpx.get(f"{default.url}/health", timeout=10).status_code == 200


def test_two_instances_serve_side_by_side_on_ports_of_their_own(pair):
    ports = []
    for instance in pair:
        served(instance.url)
        haproxy = {port for name, _, port in instance.listening() if name == "haproxy"}
        assert instance.port in haproxy and len(haproxy) == 3  # HTTP, stats, metrics
        ports.append(haproxy)
    assert not ports[0] & ports[1]
    assert not {8404, 9101} & (ports[0] | ports[1])  # never Serve's fixed stats and metrics ports


def test_served_on_loopback_nothing_listens_elsewhere(pair):
    for instance in pair:
        sockets = instance.listening()
        assert {name for name, _, _ in sockets} >= {"haproxy", "raylet", "gcs_server"}
        assert [s for s in sockets if s[1] not in LOOPBACK] == []


def test_sigterm_under_load_loses_no_request_and_leaves_nothing(tiny_dir):
    with launched(tiny_dir, "--config", str(ROOT / "configs/local.yaml")) as instance:
        instance.wait_ready()
        results, open_at_signal = asyncio.run(load_through_a_stop(instance))
        took = instance.wait_exit()
        outcomes = [outcome for outcome, _ in results]
        print(
            f"\nSIGTERM under load: launcher exited 0 {took:.1f} s after the signal; {outcomes.count('served')} "
            f"streams served whole ({len(open_at_signal)} of them open at the signal), "
            f"{outcomes.count('shutting_down')} refused with 503, {outcomes.count('refused')} refused at connect"
        )
        assert [r for r in results if r[0] not in ("served", "shutting_down", "refused")] == []  # none lost
        outcome_of = {number: outcome for outcome, number in results}
        assert open_at_signal and all(outcome_of[number] == "served" for number in open_at_signal)
        assert_left_nothing(instance)


def whole(events: list[str]) -> bool:
    """Whether a stream's events end with the usage of 128 tokens, then [DONE]."""
    if len(events) < 2 or events[-1] != "[DONE]":
        return False
    usage = json.loads(events[-2]).get("usage") or {}
    return usage.get("completion_tokens") == 128


async def load_through_a_stop(instance: Launched) -> tuple[list[tuple[str, int]], set[int]]:
    """Eight clients stream answers of 128 tokens in a loop (after a 503 they wait as its Retry-After says),
    until the port refuses them. The launcher gets SIGTERM while streams are open: those the clients have
    begun to read. Returns (outcome, request number) per request: "served" (every token, then [DONE]),
    "shutting_down" (a 503 with Retry-After), "refused" (at connect), or what else happened; and the numbers
    of the streams open at the signal."""
    results: list[tuple[str, int]] = []
    reading: set[int] = set()
    began = asyncio.Event()
    numbers = iter(range(1_000_000))

    async def one(http: httpx.AsyncClient, number: int) -> tuple[str, float]:
        request = body(max_tokens=128, ignore_eos=True, stream=True)
        async with http.stream("POST", f"{instance.url}/v1/chat/completions", json=request) as response:
            if response.status_code != 200:
                answer = (await response.aread()).decode(errors="replace")
                retry_after = response.headers.get("retry-after")
                if response.status_code == 503 and retry_after and '"shutting_down"' in answer:
                    return "shutting_down", float(retry_after)
                return f"{response.status_code} {answer[:200]}", 0.0
            events = []
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    reading.add(number)
                    began.set()
            reading.discard(number)
            return ("served" if whole(events) else f"cut after {len(events)} events: {events[-1:]}"), 0.0

    async def client(http: httpx.AsyncClient) -> None:
        while True:
            number = next(numbers)
            try:
                outcome, wait = await one(http, number)
            except httpx.ConnectError:
                results.append(("refused", number))
                return
            except httpx.HTTPError as exc:  # accepted, then dropped
                outcome, wait = repr(exc), 0.0
            results.append((outcome, number))
            await asyncio.sleep(wait)

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_keepalive_connections=0)) as http:
        clients = [asyncio.create_task(client(http)) for _ in range(8)]
        while True:  # once each client had a stream served, signal while some are being read (no await between)
            await asyncio.wait_for(began.wait(), timeout=120)
            began.clear()
            open_at_signal = set(reading)
            if open_at_signal and [outcome for outcome, _ in results].count("served") >= len(clients):
                instance.terminate()
                break
        await asyncio.wait_for(asyncio.gather(*clients), timeout=STOP_S)
    return results, open_at_signal


def test_a_start_after_sigkill_cleans_up_and_serves_on_the_same_port(tiny_dir):
    local = str(ROOT / "configs/local.yaml")
    with launched(tiny_dir, "--config", local) as killed:
        killed.wait_ready()
        killed.processes()
        killed.process.send_signal(signal.SIGKILL)  # the launcher alone, as the OOM killer would
        killed.process.wait(timeout=10)
        assert state_folder(killed.port).exists()  # what it left
        with launched(tiny_dir, "--config", local, port=killed.port) as restarted:
            restarted.wait_ready()
            assert killed.survivors(naming_its_folder=False) == []  # ended by the new start, or gone by themselves
            print("\n" + "".join(line for line in restarted.lines if line.startswith("note: ended")), end="")
            served(restarted.url)
            restarted.stop()
            assert_left_nothing(restarted)

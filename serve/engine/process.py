"""The engine in a process of its own, so that the replica's event loop and the engine never share a GIL.

The Generator replica's event loop handles Serve's calls (gRPC, pickling, bookkeeping); the engine's thread
runs a Python step between GPU waits. In one process they take turns on one interpreter lock: each delays
the other, and a GPU that waits for the host idles. Here the replica only queues requests and awaits their
results; the engine runs in a child (``python -m serve.engine.process``), as vLLM runs its engine core.

Both sides talk over a socket pair in the typed messages of ``serve.engine.messages``, each message carrying
every item queued meanwhile. A sender thread on each side writes, so neither the event loop nor the engine
waits on the socket. The child exits when the socket closes
(the replica is gone); if the child dies, its requests fail at once (503, ``engine_lost``) and ``alive`` turns
false, so Serve's health check replaces the replica. The child runs at a higher priority than the CPU tier's
processes where permitted (``EngineConfig.process_niceness``): a GPU fed by one host thread idles whenever that
thread waits for a core.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
from collections import defaultdict
from dataclasses import replace
from multiprocessing.connection import Connection

from serve.engine.build import build_engine, load_for_engine
from serve.engine.loop import AsyncEngine, EngineLoop, LoopSink
from serve.engine.messages import (
    Cancel,
    EngineStats,
    Event,
    Events,
    Failed,
    Finished,
    Ready,
    StartEngine,
    StartFailed,
    Submit,
    Tokens,
    portable,
    receive,
    send,
)
from serve.engine.requests import GenerationRequest, GenerationResult, TokenLogprobs
from serve.errors import Unavailable

log = logging.getLogger("ray.serve")

STATS_EVERY_S = 0.5
"""The child sends its stats at least this often, with or without events."""


class EngineProcess(AsyncEngine):
    """Starts the engine of ``start`` in a child process and waits until it is ready (or raises)."""

    def __init__(self, start: StartEngine) -> None:
        super().__init__()
        ours, theirs = socket.socketpair()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
        self._process = subprocess.Popen(
            [sys.executable, "-m", "serve.engine.process", str(theirs.fileno())], pass_fds=[theirs.fileno()], env=env
        )
        theirs.close()
        self._socket = ours  # shut down by stop(), which ends both threads' socket calls
        self._connection = Connection(os.dup(ours.fileno()))
        self.stats = EngineStats()
        self._sinks: dict[int, LoopSink] = {}
        self._outbox: queue.SimpleQueue[Submit | Cancel | None] = queue.SimpleQueue()
        self._failure: str | None = None  # why the engine is gone, once it is
        self._stopping = False
        send(self._connection, start)
        try:
            answer: Ready | StartFailed = receive(self._connection)
        except (EOFError, OSError):
            answer = StartFailed(f"it exited with code {self._process.wait()}")
        if isinstance(answer, StartFailed):
            self.stop()
            raise RuntimeError(f"the engine process did not start: {answer.reason}")
        self.description, self.device = answer.description, answer.device
        threading.Thread(target=self._write, name="engine-writer", daemon=True).start()
        threading.Thread(target=self._read, name="engine-reader", daemon=True).start()

    @property
    def alive(self) -> bool:
        return self._failure is None and self._process.poll() is None

    def submit(self, ticket: int, request: GenerationRequest, sink: LoopSink) -> None:
        self._sinks[ticket] = sink
        if self._failure is not None:  # checked once registered: the reader's last sweep or this covers it
            self._sinks.pop(ticket, None)
            raise _lost(self._failure)
        self._outbox.put(Submit(ticket, request, sink.streaming))

    def cancel(self, ticket: int) -> None:
        if self._sinks.pop(ticket, None) is not None:
            self._outbox.put(Cancel(ticket))

    def stop(self) -> None:
        """Shut the socket down (the child then exits) and reap the child; once."""
        if self._stopping:
            return
        self._stopping = True
        self._outbox.put(None)
        with contextlib.suppress(OSError):  # the child may have closed it already
            self._socket.shutdown(socket.SHUT_RDWR)
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def _write(self) -> None:
        """Send what the event loop queued, in one message per wake-up."""
        while (item := self._outbox.get()) is not None:
            batch = [item, *_drain(self._outbox)]
            try:
                send(self._connection, [message for message in batch if message is not None])
            except OSError:
                return
            if None in batch:
                return

    def _read(self) -> None:
        """Hand each event to its caller's event loop, one callback per loop and message."""
        while True:
            try:
                message: Events = receive(self._connection)
            except (EOFError, OSError):
                break
            except Exception:  # a message that cannot be read: end the child rather than leave callers waiting
                log.exception("unreadable message from the engine process; stopping it")
                self._process.kill()
                break
            self.stats = message.stats
            batches: dict[asyncio.AbstractEventLoop, list[tuple[LoopSink, Event]]] = defaultdict(list)
            for event in message.events:
                sink = self._sinks.pop(event.ticket, None) if event.ends else self._sinks.get(event.ticket)
                if sink is not None:
                    batches[sink.loop].append((sink, event))
            for loop, batch in batches.items():
                _hand_over(loop, batch)
        self._failure = f"the engine process exited (code {self._process.wait()})"
        if not self._stopping:
            log.error("%s; failing its %d requests", self._failure, len(self._sinks))
        for ticket in list(self._sinks):
            sink = self._sinks.pop(ticket)
            _hand_over(sink.loop, [(sink, Failed(ticket, _lost(self._failure)))])


def _lost(why: str) -> Unavailable:
    return Unavailable(f"{why}; retry", code="engine_lost")


def _hand_over(loop: asyncio.AbstractEventLoop, batch: list[tuple[LoopSink, Event]]) -> None:
    """Deliver ``batch`` on ``loop``; a caller whose loop has closed meanwhile is gone, so its events are too."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_deliver, batch)


def _deliver(batch: list[tuple[LoopSink, Event]]) -> None:
    for sink, event in batch:
        event.deliver(sink)


def _drain(items: queue.SimpleQueue) -> list:
    drained = []
    while True:
        try:
            drained.append(items.get_nowait())
        except queue.Empty:
            return drained


class _Forward:
    """The child's sink for one request: its events go to the sender thread."""

    def __init__(self, ticket: int, streaming: bool, outbox: queue.SimpleQueue) -> None:
        self.ticket, self.streaming, self.outbox = ticket, streaming, outbox

    def tokens(self, token_ids: list[int], logprobs: TokenLogprobs | None = None) -> None:
        self.outbox.put(Tokens(self.ticket, token_ids, logprobs))

    def finish(self, result: GenerationResult) -> None:
        self.outbox.put(Finished(self.ticket, result))

    def fail(self, error: BaseException) -> None:
        self.outbox.put(Failed(self.ticket, portable(error)))


def _send_events(connection: Connection, outbox: queue.SimpleQueue, loop: EngineLoop) -> None:
    """The child's sender: every queued event in one message, with the stats, at least every ``STATS_EVERY_S``."""
    while True:
        try:
            events = [outbox.get(timeout=STATS_EVERY_S), *_drain(outbox)]
        except queue.Empty:
            events = []
        try:
            send(connection, Events(events, replace(loop.stats)))
        except OSError:
            return


def prioritize(niceness: int) -> None:
    """Give the calling thread, and the threads it starts from now on, this niceness; where that is not
    permitted, say so and keep the current one."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, niceness)
    except PermissionError:
        logging.warning("the engine process keeps niceness %d: %d needs root or CAP_SYS_NICE", os.nice(0), niceness)


def main() -> None:
    """The child: load the model, report ready, then serve the parent's messages until the socket closes."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine process %(levelname)s %(message)s")
    connection = Connection(int(sys.argv[1]))
    start: StartEngine = receive(connection)
    prioritize(start.engine.process_niceness)  # before the engine's threads start: they inherit it
    try:
        loaded = load_for_engine(start.model, start.engine)
        engine = build_engine(loaded, start.engine)
        engine.warm_up()
    except Exception as exc:
        logging.exception("the engine could not start")
        send(connection, StartFailed(f"{type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None
    description = f"{start.engine.kind} engine on {loaded.device} ({str(loaded.dtype).removeprefix('torch.')})"
    send(connection, Ready(description, loaded.device.type))  # before the sender starts: one writer at a time
    loop = EngineLoop(engine)
    outbox: queue.SimpleQueue = queue.SimpleQueue()
    threading.Thread(target=_send_events, args=(connection, outbox, loop), name="sender", daemon=True).start()
    while True:
        try:
            messages = receive(connection)
        except (EOFError, OSError):
            break  # the replica is gone
        for message in messages:
            if isinstance(message, Submit):
                loop.submit(message.ticket, message.request, _Forward(message.ticket, message.streaming, outbox))
            else:
                loop.cancel(message.ticket)
    loop.stop()


if __name__ == "__main__":
    main()

"""Everything that travels between a Generator replica and its engine process, and how it travels.

The replica (parent) sends :class:`StartEngine` once, then lists of :class:`Submit` and :class:`Cancel`; the
engine process (child) answers :class:`Ready` or :class:`StartFailed` once, then :class:`Events`: the events of
its requests (:class:`Tokens`, :class:`Finished`, :class:`Failed`) with its :class:`EngineStats`. Every message
is a dataclass, pickled (protocol 5) by :func:`send`, its large arrays (the pixels) travelling out of band as raw
buffers: Ray has already deserialized them once, and they are not copied into a pickle again.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, ClassVar

from serve.engine.config import EngineConfig, ModelConfig
from serve.engine.requests import GenerationRequest, GenerationResult, Sink, TokenLogprobs

OUT_OF_BAND_BYTES = 16384
"""Arrays at least this large travel as raw buffers beside the pickle; smaller ones inside it."""


@dataclass(frozen=True)
class StartEngine:
    """Parent -> child, first: the checkpoint to load and the engine to build around it."""

    model: ModelConfig
    engine: EngineConfig


@dataclass(frozen=True)
class Ready:
    """Child -> parent, first: the engine is warmed up; ``device`` is where it runs (``cuda``, ``cpu``...)."""

    description: str
    device: str


@dataclass(frozen=True)
class StartFailed:
    """Child -> parent, first: the engine could not start, and why."""

    reason: str


@dataclass(frozen=True)
class Submit:
    """Parent -> child: a request to generate for, by the parent's ticket."""

    ticket: int
    request: GenerationRequest
    streaming: bool


@dataclass(frozen=True)
class Cancel:
    """Parent -> child: drop a request, waiting or running; nothing more is sent for it."""

    ticket: int


@dataclass(frozen=True)
class Tokens:
    """Child -> parent: new tokens of a streaming request (and their log-probabilities, if it asked)."""

    ticket: int
    token_ids: list[int]
    logprobs: TokenLogprobs | None = None
    ends: ClassVar[bool] = False

    def deliver(self, sink: Sink) -> None:
        sink.tokens(self.token_ids, self.logprobs)


@dataclass(frozen=True)
class Finished:
    """Child -> parent: a request's result; its last event."""

    ticket: int
    result: GenerationResult
    ends: ClassVar[bool] = True

    def deliver(self, sink: Sink) -> None:
        sink.finish(self.result)


@dataclass(frozen=True)
class Failed:
    """Child -> parent: a request's error; its last event."""

    ticket: int
    error: BaseException
    ends: ClassVar[bool] = True

    def deliver(self, sink: Sink) -> None:
        sink.fail(self.error)


Event = Tokens | Finished | Failed


@dataclass
class EngineStats:
    """What the engine's loop has done, for metrics and log lines.

    Queue depth and running sequences; steps, finished requests and generated tokens; the seconds spent in steps
    (``busy_s``), and of those the engine thread's CPU time (``step_cpu_s``) and its waits for the device
    (``device_wait_s``): the rest is time the thread was ready but not running (other processes or threads held
    the cores or the interpreter), which slows a GPU fed from the host. ``step_rows`` sums the sequences running
    after each step (a mean batch); ``engine_s`` sums the seconds finished requests spent in the engine, queued
    and generating. Of the steps, the admissions of waiting requests: how many, the requests they took and their
    seconds (``admission_s``; the rest of ``busy_s`` is decode steps)."""

    waiting: int = 0
    running: int = 0
    steps: int = 0
    finished: int = 0
    generated_tokens: int = 0
    busy_s: float = 0.0
    step_rows: int = 0
    engine_s: float = 0.0
    step_cpu_s: float = 0.0
    device_wait_s: float = 0.0
    admissions: int = 0
    admitted: int = 0
    admission_s: float = 0.0

    def summary(self, before: EngineStats, seconds: float) -> str:
        """One log line on the ``seconds`` since ``before``: the rates and the share of time in steps."""
        steps = self.steps - before.steps
        batch = (self.step_rows - before.step_rows) / max(steps, 1)
        finished = self.finished - before.finished
        inside = (self.engine_s - before.engine_s) / max(finished, 1)
        cpu, device = self.step_cpu_s - before.step_cpu_s, self.device_wait_s - before.device_wait_s
        admissions, admitting = self.admissions - before.admissions, self.admission_s - before.admission_s
        admitted = (self.admitted - before.admitted) / max(admissions, 1)
        return (
            f"engine: {steps / seconds:.0f} steps/s, {finished / seconds:.1f} requests/s, "
            f"{(self.generated_tokens - before.generated_tokens) / seconds:.0f} tokens/s, mean batch {batch:.1f}, "
            f"busy {(self.busy_s - before.busy_s) / seconds:.0%} (on a core {cpu / seconds:.0%}, "
            f"waiting on the device {device / seconds:.0%}; admitting {admitting / seconds:.0%}, "
            f"{admissions / seconds:.1f} admissions/s of {admitted:.1f} requests), {self.waiting} waiting, "
            f"{inside * 1e3:.0f} ms a request in the engine"
        )


@dataclass(frozen=True)
class Events:
    """Child -> parent: the events queued since the last message (perhaps none) and the engine's stats."""

    events: list[Event]
    stats: EngineStats


def send(connection: Connection, message: Any) -> None:
    """Send ``message`` pickled (protocol 5), its large contiguous arrays' data out of band as raw buffers."""
    buffers: list[pickle.PickleBuffer] = []

    def in_band(buffer: pickle.PickleBuffer) -> bool:
        if buffer.raw().nbytes < OUT_OF_BAND_BYTES:
            return True
        buffers.append(buffer)
        return False

    payload = pickle.dumps(message, protocol=5, buffer_callback=in_band)
    connection.send_bytes(struct.pack("!I", len(buffers)) + payload)
    for buffer in buffers:
        connection.send_bytes(buffer.raw())


def receive(connection: Connection) -> Any:
    """A message from :func:`send`; its arrays are read-only views of the received buffers."""
    head = connection.recv_bytes()
    (count,) = struct.unpack_from("!I", head)
    buffers = [connection.recv_bytes() for _ in range(count)]
    return pickle.loads(memoryview(head)[4:], buffers=buffers)


def portable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling (and rebuilding on the other side), else a ``RuntimeError`` with its text."""
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
    return error

"""An engine on its own thread, driven by asyncio callers.

The thread owns the engine: it takes submitted requests, calls ``engine.step()`` while there is work, and
sleeps otherwise. Callers on the event loop only enqueue and await, so GPU work never blocks the loop and
requests that arrive together are batched by the engine itself. A caller that is cancelled (the client
went away) cancels its request in the engine, which frees its cache slot at once.

``AsyncEngine`` holds the coroutines callers use; ``EngineLoop`` runs the engine on a thread of this process,
``serve.engine.process.EngineProcess`` in a process of its own (what the Generator uses).

    loop = EngineLoop(engine)
    result = await loop.generate(request)
    async for item in loop.stream(request): ...   # Generated (new token ids), then the GenerationResult
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator

from serve.engine.base import Engine
from serve.engine.messages import EngineStats
from serve.engine.requests import Generated, GenerationRequest, GenerationResult, Sink, TokenLogprobs
from serve.errors import ServiceError

log = logging.getLogger(__name__)


class LoopSink:
    """Delivers engine events to an asyncio loop, from another thread (a sink of ``serve.engine``)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, streaming: bool) -> None:
        self.loop = loop
        self.streaming = streaming
        self.events: asyncio.Queue[Generated | GenerationResult | BaseException] = asyncio.Queue()

    def tokens(self, token_ids: list[int], logprobs: TokenLogprobs | None = None) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, Generated(token_ids, logprobs))

    def finish(self, result: GenerationResult) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, result)

    def fail(self, error: BaseException) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, error)


class AsyncEngine(ABC):
    """Coroutines over an engine that runs elsewhere (a thread, a process) and takes requests by ticket."""

    stats: EngineStats

    def __init__(self) -> None:
        self._tickets = itertools.count()

    @property
    @abstractmethod
    def alive(self) -> bool:
        """Whether the engine still runs."""

    @abstractmethod
    def submit(self, ticket: int, request: GenerationRequest, sink: Sink) -> None:
        """Queue a request (from any thread); its events, or its error, go to ``sink``."""

    @abstractmethod
    def cancel(self, ticket: int) -> None:
        """Drop a request, waiting or running (from any thread); nothing more reaches its sink."""

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Generate for one request; raises the engine's error, or cancels the request if cancelled."""
        async for item in self._events(request, streaming=False):
            if isinstance(item, GenerationResult):
                return item
        raise RuntimeError("the engine ended a request without a result")

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Generated | GenerationResult]:
        """Yield new tokens as they are generated, then the result."""
        async for item in self._events(request, streaming=True):
            yield item

    async def _events(self, request: GenerationRequest, streaming: bool) -> AsyncIterator:
        sink = LoopSink(asyncio.get_running_loop(), streaming)
        ticket = next(self._tickets)
        self.submit(ticket, request, sink)
        done = False
        try:
            while not done:
                item = await sink.events.get()
                if isinstance(item, BaseException):
                    done = True
                    raise item
                done = isinstance(item, GenerationResult)
                yield item
        finally:
            if not done:
                self.cancel(ticket)


class EngineLoop(AsyncEngine):
    """Runs ``engine`` on a daemon thread; its coroutines may be called from any event loop."""

    def __init__(self, engine: Engine, idle_wait_s: float = 0.05) -> None:
        super().__init__()
        self.engine = engine
        self.idle_wait_s = idle_wait_s
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue[tuple[str, int, GenerationRequest | None, Sink | None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, ticket: int, request: GenerationRequest, sink: Sink) -> None:
        self._send("submit", ticket, request, sink)

    def cancel(self, ticket: int) -> None:
        self._send("cancel", ticket, None, None)

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    def _send(self, kind: str, ticket: int, request: GenerationRequest | None, sink: Sink | None) -> None:
        self._inbox.put((kind, ticket, request, sink))
        self._wake.set()

    def _run(self) -> None:
        engine_ids: dict[int, int] = {}
        while not self._stopped:
            self._wake.clear()
            while not self._inbox.empty():
                kind, ticket, request, sink = self._inbox.get()
                if kind == "submit":
                    try:
                        engine_ids[ticket] = self.engine.submit(
                            request, _Counting(sink, self.stats, engine_ids, ticket)
                        )
                    except Exception as exc:
                        sink.fail(exc)
                elif ticket in engine_ids:
                    self.engine.cancel(engine_ids.pop(ticket))
            self._gauge()
            if not self.engine.has_work:
                self._wake.wait(self.idle_wait_s)
                continue
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                wait = self.engine.step()
            except Exception as exc:  # a defect: the requests' state is unknown, so none gets a half answer
                held = len(self.engine.waiting) + self.engine.running_count
                log.exception("engine step failed; failing the %d requests in the engine", held)
                message = f"the engine failed while serving this request ({type(exc).__name__}); it has been logged"
                self.engine.fail_all(ServiceError(message, code="engine_error"))  # a 500, whatever exc was
                wait = None
            self.stats.busy_s += time.perf_counter() - started
            self.stats.step_cpu_s += time.thread_time() - cpu
            engine = self.engine
            self.stats.device_wait_s = engine.device_wait_s
            self.stats.admissions, self.stats.admitted = engine.admissions, engine.admitted
            self.stats.admission_s = engine.admission_s
            self.stats.step_rows += engine.running_count
            if wait:
                self._wake.wait(wait)
            self.stats.steps += 1
            self._gauge()

    def _gauge(self) -> None:
        self.stats.waiting = len(self.engine.waiting)
        self.stats.running = self.engine.running_count


class _Counting:
    """Wraps a sink to count results and tokens, and to forget the ticket when the request ends."""

    def __init__(self, sink: Sink, stats: EngineStats, engine_ids: dict[int, int], ticket: int) -> None:
        self.sink, self.stats, self.engine_ids, self.ticket = sink, stats, engine_ids, ticket
        self.streaming = sink.streaming
        self.submitted = time.perf_counter()

    def tokens(self, token_ids: list[int], logprobs: TokenLogprobs | None = None) -> None:
        self.sink.tokens(token_ids, logprobs)

    def finish(self, result: GenerationResult) -> None:
        self.engine_ids.pop(self.ticket, None)
        self.stats.finished += 1
        self.stats.generated_tokens += result.completion_tokens
        self.stats.engine_s += time.perf_counter() - self.submitted
        self.sink.finish(result)

    def fail(self, error: BaseException) -> None:
        self.engine_ids.pop(self.ticket, None)
        self.sink.fail(error)

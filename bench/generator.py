"""The load generator: one process sending a workload to the service, point by point, one record per request.

One dispatcher serves every mode (``bench.schedule``). It takes the next arrival time (none in a closed loop),
waits for it and for a free slot (the in-flight cap, or the closed loop's concurrency), and sends the next
workload item through ``serve.app.client.KosmosClient``; late arrivals are skipped, not caught up.
"""

from __future__ import annotations

import asyncio
import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.sharedctypes import SynchronizedArray
from multiprocessing.synchronize import Barrier

import numpy as np
from tqdm import tqdm

from bench.records import CANCELLED, TIMEOUT, RequestRecord
from bench.schedule import LoadConfig, LoadPoint, Lookahead, Step, arrival_times, latest_due
from bench.workload import WorkItem
from serve.app.client import APIError, KosmosClient


async def acquire_before(slots: asyncio.Semaphore, deadline: float, clock: Callable[[], float]) -> bool:
    """Take a slot if one frees before ``deadline`` (run time); False, holding none, if not."""
    if math.isinf(deadline):
        await slots.acquire()
        return True
    try:
        await asyncio.wait_for(slots.acquire(), max(0.0, deadline - clock()))
    except asyncio.TimeoutError:
        return False
    if clock() >= deadline:
        slots.release()
        return False
    return True


@dataclass
class PointResult:
    """When one point ran (seconds from the run's start), its steady window, and what it sent and skipped."""

    index: int
    label: str
    mode: str
    concurrency: int | None
    rate: float | None
    x: float | None
    start_s: float
    window_start_s: float
    window_end_s: float
    end_s: float
    sent: int
    skipped: int
    schedule: list[Step]
    """The arrival-rate steps as run, in run time (empty in a closed loop)."""
    sender_cpu_s: float = 0.0
    """CPU seconds the sending process (or processes, summed) spent from the point's start to its end: the load
    generator's own cost, without its start-up and the workload's encoding."""


class LoadGenerator:
    """Sends a workload to one service; ``run_point`` for each load point, records in ``records``."""

    def __init__(
        self,
        client: KosmosClient,
        workload: list[WorkItem],
        config: LoadConfig,
        clock: Callable[[], float],
        progress: bool = True,
        shared_progress: SynchronizedArray | None = None,
    ) -> None:
        self.client = client
        self.workload = workload
        self.config = config
        self.clock = clock
        self.progress = progress
        self.shared_progress = shared_progress
        """The point being sent, then each point's requests finished, shared with the other sending processes."""
        self.records: list[RequestRecord] = []

    def _finished(self, point: int) -> None:
        if self.shared_progress is not None:
            with self.shared_progress.get_lock():
                self.shared_progress[1 + point] += 1

    async def run_point(self, index: int, point: LoadPoint) -> PointResult:
        config, clock = self.config, self.clock
        start, cpu = clock(), time.process_time()
        steps = point.steps()
        rng = np.random.default_rng([config.seed, index])
        arrivals = None if steps is None else Lookahead(start + t for t in arrival_times(steps, config.burstiness, rng))
        slots = asyncio.Semaphore(point.concurrency if point.mode == "closed" else config.max_in_flight)
        by_count = config.warmup_requests > 0
        window_start = math.inf if by_count else start + config.warmup_s
        window_end = start + (point.shape_duration_s if point.mode == "shape" else config.warmup_s + config.duration_s)
        if by_count:
            window_end = math.inf
        in_flight: set[asyncio.Task[None]] = set()
        sent = skipped = 0
        bar = tqdm(desc=point.label, unit="req", disable=not self.progress, leave=True)
        if self.shared_progress is not None:
            self.shared_progress[0] = index
        while True:
            due = None
            if arrivals is not None:
                due = arrivals.take()
                if due is None or due >= window_end:
                    break
                await asyncio.sleep(max(0.0, due - clock()))
            if not await acquire_before(slots, window_end, clock):
                if arrivals is not None:  # this arrival and the rest of the window's never got a slot
                    skipped += 1
                    while arrivals.head is not None and arrivals.head < window_end:
                        arrivals.take()
                        skipped += 1
                break
            now = clock()
            if arrivals is not None and due is not None:
                due, dropped = latest_due(arrivals, due, now, config.max_lag_s)
                skipped += dropped
            warm = sent < config.warmup_requests or now < start + config.warmup_s
            if by_count and not warm and math.isinf(window_start):
                window_start = now
                window_end = now + config.duration_s
            item = self.workload[sent % len(self.workload)]
            task = asyncio.create_task(self.issue(index, sent, item, now if due is None else due, warm))
            in_flight.add(task)
            task.add_done_callback(
                lambda t: (slots.release(), in_flight.discard(t), bar.update(), self._finished(index))
            )
            sent += 1
        if arrivals is not None and math.isfinite(window_end):
            await asyncio.sleep(max(0.0, window_end - clock()))  # an open loop's window lasts to its end
        if in_flight:
            _, late = await asyncio.wait(set(in_flight), timeout=config.grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        bar.close()
        schedule = [
            (start + a, min(start + b, window_end), rate) for a, b, rate in steps or [] if start + a < window_end
        ]
        return PointResult(
            index=index,
            label=point.label,
            mode=point.mode,
            concurrency=point.concurrency,
            rate=point.rate,
            x=point.x,
            start_s=start,
            window_start_s=window_start,
            window_end_s=window_end,
            end_s=clock(),
            sent=sent,
            skipped=skipped,
            schedule=schedule,
            sender_cpu_s=time.process_time() - cpu,
        )

    async def issue(self, point: int, index: int, item: WorkItem, scheduled: float, warm: bool) -> None:
        """Send one request and fill its record (appended at once, so a cancelled request is recorded too)."""
        start = self.clock()
        record = RequestRecord(
            point=point,
            index=index,
            item=item.index,
            task=item.task,
            image_width=item.width,
            image_height=item.height,
            image_bytes=len(item.image),
            warmup=warm,
            scheduled_s=scheduled,
            start_s=start,
            end_s=start,
            status=0,
        )
        self.records.append(record)
        try:
            await asyncio.wait_for(self._call(item, record), self.config.timeout_s)
            record.status = 200
        except APIError as exc:
            record.status = exc.status
            record.error_type = exc.type or "error"  # "timeout": the server's 504, or the client's deadline
            record.error = exc.message[:300]
        except asyncio.TimeoutError:
            record.error_type, record.error = TIMEOUT, f"no answer within {self.config.timeout_s:g} s"
        except asyncio.CancelledError:
            record.error_type, record.error = CANCELLED, "still in flight when the drain's grace period ended"
            raise
        finally:
            record.end_s = self.clock()

    async def _call(self, item: WorkItem, record: RequestRecord) -> None:
        if not self.config.stream:
            completion = await self.client.complete(item.image, **item.request_fields())
            usage = completion.usage
        else:
            usage = {}
            async for chunk in self.client.stream(item.image, **item.request_fields()):
                if any(choice.get("delta", {}).get("content") for choice in chunk.get("choices", [])):
                    record.chunk_times_s.append(self.clock())
                usage = chunk.get("usage") or usage
            record.first_token_s = record.chunk_times_s[0] if record.chunk_times_s else None
        record.prompt_tokens = int(usage.get("prompt_tokens", 0))
        record.completion_tokens = int(usage.get("completion_tokens", 0))


@dataclass(frozen=True)
class Target:
    """What every sending process shares: the service, the workload, the settings and the run's clock origin."""

    url: str
    api_key: str | None
    workload: list[WorkItem]
    config: LoadConfig
    origin: float
    """``time.perf_counter()`` at the run's start: CLOCK_MONOTONIC, the same in every process of a machine."""


async def send_points(
    target: Target,
    points: list[LoadPoint],
    progress: bool,
    barrier: Barrier | None = None,
    shared_progress: SynchronizedArray | None = None,
) -> tuple[list[PointResult], list[RequestRecord]]:
    """One process's sending: every point in turn, each begun once all processes reach ``barrier``, its
    finished requests counted in ``shared_progress`` if given."""
    config = target.config

    def clock() -> float:
        return time.perf_counter() - target.origin

    connections = max([config.max_in_flight] + [p.concurrency or 0 for p in points])
    gc.freeze()  # what exists now (a large heap once torch is imported) stays out of collections during the run
    try:
        async with KosmosClient(
            target.url, api_key=target.api_key, timeout=config.timeout_s, max_connections=connections
        ) as client:
            await client.wait_ready(config.ready_timeout_s)
            generator = LoadGenerator(client, target.workload, config, clock, progress, shared_progress)
            results = []
            for index, point in enumerate(points):
                if barrier is not None:
                    await asyncio.to_thread(barrier.wait, config.ready_timeout_s + config.grace_s + 60)
                results.append(await generator.run_point(index, point))
    finally:
        gc.unfreeze()
    return results, generator.records

"""A load run (:func:`run_load`): every point in turn against the service, with Serve's replica counts polled
alongside (``bench.replicas``), from one sending process (``bench.generator``) or several, each with its share
of every point, their results merged; with several, this process shows their progress together.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from multiprocessing.sharedctypes import SynchronizedArray
from multiprocessing.synchronize import Barrier

from tqdm import tqdm

from bench.generator import PointResult, Target, send_points
from bench.records import RequestRecord
from bench.replicas import ReplicaPoller, ReplicaSample
from bench.schedule import LoadConfig, LoadPoint
from bench.workload import WorkItem
from serve.app.client import APIError, KosmosClient


@dataclass
class LoadRun:
    """Everything a run measured, before any statistics."""

    started_at: str
    points: list[PointResult]
    records: list[RequestRecord]
    replicas: list[ReplicaSample] = field(default_factory=list)
    replica_poll_failures: int = 0
    model: str | None = None
    """The model the service lists first at ``/v1/models`` (None if it lists none)."""


async def served_model(url: str, api_key: str | None, config: LoadConfig) -> str | None:
    """Wait for ``/health``, then the first model ``/v1/models`` lists (None if it cannot say)."""
    async with KosmosClient(url, api_key=api_key, timeout=config.timeout_s, max_connections=1) as client:
        await client.wait_ready(config.ready_timeout_s)
        try:
            models = await client.models()
        except (APIError, KeyError, TypeError):
            return None
    return models[0] if models else None


async def run_load(
    url: str,
    points: list[LoadPoint],
    workload: list[WorkItem],
    config: LoadConfig,
    *,
    api_key: str | None = None,
    serve_api: str | None = None,
    serve_api_token: str | None = None,
    poll_interval_s: float = 1.0,
    progress: bool = True,
    processes: int = 1,
) -> LoadRun:
    """Run every point in turn against ``url`` (after ``/health`` answers), polling replicas if asked.

    With ``processes`` above 1, that many processes send, each a share of every point (its concurrency, rate
    and in-flight cap divided), starting each point together; their records are merged on one clock. One
    Python process tops out at a few hundred requests a second, below what one GPU replica serves.
    """
    config.check(points)
    if processes < 1:
        raise ValueError("processes must be at least 1")
    origin = time.perf_counter()

    def clock() -> float:
        return time.perf_counter() - origin

    model = await served_model(url, api_key, config)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    poller = ReplicaPoller(serve_api, clock, poll_interval_s, serve_api_token) if serve_api else None
    polling = asyncio.create_task(poller.run()) if poller else None
    target = Target(url, api_key, workload, config, origin)
    try:
        if processes == 1:
            results, records = await send_points(target, points, progress)
        else:
            results, records = await send_in_processes(target, points, processes, progress)
    finally:
        if polling is not None:
            polling.cancel()
            await asyncio.gather(polling, return_exceptions=True)
    return LoadRun(
        started_at,
        results,
        records,
        poller.samples if poller else [],
        poller.failures if poller else 0,
        model,
    )


def share(point: LoadPoint, worker: int, workers: int) -> LoadPoint:
    """``worker``'s part of ``point`` among ``workers`` processes: concurrency split (a process may get none, and
    then only keeps time with the others), rates divided."""
    if point.mode == "closed":
        concurrency = point.concurrency or 0
        return replace(point, concurrency=concurrency // workers + (worker < concurrency % workers))
    shape = tuple(replace(s, start_rate=s.start_rate / workers, end_rate=s.end_rate / workers) for s in point.shape)
    return replace(point, rate=(point.rate or 0.0) / workers, shape=shape)


_barrier: Barrier | None = None
"""In a sending process: the barrier all senders meet at before each point (set when the process starts)."""

_progress: SynchronizedArray | None = None
"""In a sending process: the point being sent, then each point's requests finished so far, shared by every
sender (``bench.generator.LoadGenerator``)."""


def _set_shared(barrier: Barrier, progress: SynchronizedArray) -> None:
    global _barrier, _progress
    _barrier, _progress = barrier, progress


def _send_share(target: Target, points: list[LoadPoint]) -> tuple[list[PointResult], list[RequestRecord]]:
    return asyncio.run(send_points(target, points, False, _barrier, _progress))


async def show_progress(progress: SynchronizedArray, points: list[LoadPoint], interval_s: float = 0.5) -> None:
    """A bar per point of the requests the sending processes finished, until cancelled."""
    bar, current = None, -1

    def show(index: int) -> None:
        if bar is not None:
            bar.n = progress[1 + index]
            bar.refresh()

    try:
        while True:
            if progress[0] != current:
                if bar is not None:
                    show(current)
                    bar.close()
                current = progress[0]
                bar = tqdm(desc=points[current].label, unit="req", leave=True)
            show(current)
            await asyncio.sleep(interval_s)
    finally:
        if bar is not None:
            show(current)
            bar.close()


async def send_in_processes(
    target: Target, points: list[LoadPoint], workers: int, progress: bool = False
) -> tuple[list[PointResult], list[RequestRecord]]:
    """:func:`send_points` in ``workers`` processes, each with its share of every point; merged results. With
    ``progress``, a bar per point counts the requests all of them finished."""
    config = target.config
    cap = -(-config.max_in_flight // workers)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(workers)
    shared = context.Array("q", [0] + [0] * len(points))
    loop = asyncio.get_running_loop()
    showing = asyncio.create_task(show_progress(shared, points)) if progress else None
    with ProcessPoolExecutor(workers, mp_context=context, initializer=_set_shared, initargs=(barrier, shared)) as pool:
        shares = [
            loop.run_in_executor(
                pool,
                _send_share,
                replace(target, config=replace(config, seed=config.seed * workers + worker, max_in_flight=cap)),
                [share(p, worker, workers) for p in points],
            )
            for worker in range(workers)
        ]
        try:
            parts = await asyncio.gather(*shares)
        except BaseException:
            barrier.abort()  # the others stop at their next meeting rather than wait there for the one that failed
            raise
        finally:
            if showing is not None:
                showing.cancel()
                await asyncio.gather(showing, return_exceptions=True)
    results = [merge_points(point, [part[0][index] for part in parts]) for index, point in enumerate(points)]
    records = sorted((r for part in parts for r in part[1]), key=lambda r: (r.point, r.start_s))
    for point in range(len(points)):  # number each point's requests anew, in the order they were sent
        for index, record in enumerate(r for r in records if r.point == point):
            record.index = index
    return results, records


def merge_points(point: LoadPoint, parts: list[PointResult]) -> PointResult:
    """One point's result from its senders' parts: the window all of them were steady in, their sums."""
    first = parts[0]
    return replace(
        first,
        concurrency=point.concurrency,
        rate=point.rate,
        x=point.x,
        start_s=min(p.start_s for p in parts),
        window_start_s=max(p.window_start_s for p in parts),
        window_end_s=min(p.window_end_s for p in parts),
        end_s=max(p.end_s for p in parts),
        sent=sum(p.sent for p in parts),
        skipped=sum(p.skipped for p in parts),
        schedule=[(start, end, rate * len(parts)) for start, end, rate in first.schedule],
        sender_cpu_s=sum(p.sender_cpu_s for p in parts),
    )

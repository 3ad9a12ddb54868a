"""The GPU tier: the engine behind an asyncio facade, deployed by ``serve.app.builder`` on GPU replicas.

``Generator`` starts the engine in a process of its own (``serve.engine.process``: the model, the GPU and the
engine's loop live there) and turns prepared requests into generated tokens. Requests that arrive together
are batched by the engine; the replica's event loop only enqueues and awaits. Without a GPU the engine runs
on the CPU and says so in the log.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, replace

from serve.app.config import ServiceConfig
from serve.app.metrics import EngineMetrics
from serve.engine.messages import StartEngine
from serve.engine.process import EngineProcess
from serve.engine.requests import Generated, GenerationRequest, GenerationResult

log = logging.getLogger("ray.serve")

STATS_LOG_S = 10
"""Seconds between the engine's log lines (steps, requests and tokens per second, batch, busy time)."""


class Generator:
    """Deployed on GPU replicas (falls back to the CPU where there is none)."""

    def __init__(self, config: ServiceConfig) -> None:
        self.loop = EngineProcess(StartEngine(config.model, config.engine))
        self.metrics = EngineMetrics()
        self._sampler: asyncio.Task | None = None
        self.answered, self.answered_s = 0, 0.0  # requests answered by generate(), and their seconds in it
        if self.loop.device == "cpu" and config.engine.kind != "pixels":  # the pixel engine runs on the CPU
            log.warning("Generator: no GPU visible; generating on the CPU (slow): %s", self.loop.description)
        log.info("Generator ready: %s", self.loop.description)

    def __del__(self) -> None:
        """Serve calls this when the replica shuts down: the engine process goes with it."""
        if hasattr(self, "loop"):
            self.loop.stop()

    def _sample_metrics(self) -> None:
        """Start, once, the task that copies the engine's stats into the metrics every second."""

        async def sample() -> None:
            last, answered, answered_s = replace(self.loop.stats), self.answered, self.answered_s
            for second in itertools.count(1):
                await asyncio.sleep(1.0)
                stats = self.loop.stats
                self.metrics.sample(stats)
                if second % STATS_LOG_S == 0:
                    if stats.steps > last.steps:  # a line while there is work
                        inside = (self.answered_s - answered_s) / max(self.answered - answered, 1)
                        log.info(f"{stats.summary(last, STATS_LOG_S)}, {inside * 1e3:.0f} in the replica")
                    last, answered, answered_s = replace(stats), self.answered, self.answered_s

        if self._sampler is None:
            self._sampler = asyncio.create_task(sample())

    async def ready(self) -> bool:
        self._sample_metrics()
        return self.loop.alive

    def check_health(self) -> None:
        """Serve calls this periodically; a dead engine process gets the replica replaced."""
        if not self.loop.alive:
            raise RuntimeError("the engine process has stopped")

    async def stats(self) -> dict[str, int]:
        return asdict(self.loop.stats)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        """Tokens for a prepared request."""
        self._sample_metrics()
        began = time.perf_counter()
        result = await self.loop.generate(request)
        self.answered, self.answered_s = self.answered + 1, self.answered_s + time.perf_counter() - began
        return result

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Generated | GenerationResult]:
        """New tokens as they come (with their log-probabilities, if asked), then the result."""
        self._sample_metrics()
        async for item in self.loop.stream(request):
            yield item

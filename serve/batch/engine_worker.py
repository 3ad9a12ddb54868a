"""The GPU operator of a batch: an actor of Ray Data's pool that holds one engine and keeps it full.

The engine runs in a process of its own (``serve.engine.process``, as the service's Generator runs it), so that
the actor's event loop and the engine's host thread never share a GIL. The actor's ``__call__`` is a coroutine:
Ray Data calls it with several blocks at once (``max_concurrent_calls_per_actor`` tasks, each its blocks), every
item of every block goes into the engine at once, and the engine's continuous batching runs them together, admitting
the next block's requests as slots free up. What an actor holds is thus bounded by the calls in flight times the
block size: enough to keep the engine's slots full, never the whole input.

An item with stop strings is streamed and decoded as its tokens come, and its generation cancelled at the stop
string, as the service's Preprocessor does (``serve.kosmos2.decoding.follow``); the others come back as the engine's
result and are decoded on the CPU. If the engine process dies, the actor exits: Ray Data restarts it and retries
the tasks it held, so that no item is answered with a lost engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time

import pyarrow as pa

from serve.app.config import ServiceConfig
from serve.batch.items import Item, from_block, to_block
from serve.batch.stages import pipeline_for
from serve.engine.messages import StartEngine
from serve.engine.process import EngineProcess
from serve.errors import ServiceError
from serve.kosmos2.decoding import follow

log = logging.getLogger("ray.data")

ENGINE_LOST_EXIT = 75
"""The actor's exit status when its engine process has died (Ray Data then restarts the actor)."""


class EngineWorker:
    """Ray Data's callable class for the generation operator (one actor per engine)."""

    def __init__(self, config: ServiceConfig) -> None:
        self.engine = EngineProcess(StartEngine(config.model, config.engine))
        self.pipeline = pipeline_for(config)
        log.info("batch engine ready: %s", self.engine.description)

    def __del__(self) -> None:
        if hasattr(self, "engine"):
            self.engine.stop()

    async def __call__(self, block: pa.Table) -> pa.Table:
        items = from_block(block)
        await asyncio.gather(*(self._generate(item) for item in items if item.failure is None))
        if not self.engine.alive:  # its requests failed with engine_lost: let Ray Data run them again
            log.error("the engine process has died; exiting so that Ray Data restarts this actor")
            os._exit(ENGINE_LOST_EXIT)
        return to_block([item.without_pixels() for item in items], block.schema.field("key").type)

    async def _generate(self, item: Item) -> None:
        prepared, item.submitted_at = item.prepared, time.time()
        try:
            if prepared.stop:
                decoding = self.pipeline.decoding(prepared)
                async with contextlib.aclosing(self.engine.stream(prepared.request)) as tokens:
                    async for outcome in follow(decoding, tokens, cancel=lambda: None):
                        item.generated = outcome  # the last one is the Outcome; leaving the stream cancels the rest
            else:
                item.generated = await self.engine.generate(prepared.request)
            item.generated_at = time.time()
        except ServiceError as exc:
            item.failure = exc

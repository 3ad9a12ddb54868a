"""The record every input line or image travels in between the operators, and the blocks that carry it.

A block between operators is an Arrow table of two columns: ``key`` (the input's key: a line's byte offset in the
requests file, an image's id) and ``item`` (an :class:`Item`, pickled: a typed record with the prepared request,
the error that stopped it, or what the engine generated). Each operator takes a block, updates its items and
hands a block on; an item with a ``failure`` passes through untouched to its output row.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pyarrow as pa

from serve.batch.batch_file import LineError
from serve.engine.requests import GenerationResult
from serve.errors import ServiceError
from serve.kosmos2.decoding import Outcome
from serve.kosmos2.pipeline import Prepared

_NO_PIXELS = np.zeros((0, 0, 3), np.uint8)


@dataclass
class Item:
    """One input on its way to its output row. ``source``: what the output repeats of the input (the batch
    line's ``custom_id``; the image's reference and the task asked); ``request_id``: the completion's id."""

    key: int | str
    source: dict[str, Any]
    request_id: str
    prepared: Prepared | None = None
    failure: ServiceError | LineError | None = None
    generated: GenerationResult | Outcome | None = None
    """The engine's result; for a request with stop strings, the outcome decoded as its tokens came (the
    generation stopped at the stop string, as the service stops it)."""
    submitted_at: float | None = None
    generated_at: float | None = None
    """When the engine took the request and when it gave its answer (``time.time()``)."""

    def without_pixels(self) -> Item:
        """This item with the prepared request's pixels dropped (what finishing needs is the rest)."""
        if self.prepared is None:
            return self
        request = replace(self.prepared.request, pixels=_NO_PIXELS)
        return replace(self, prepared=replace(self.prepared, request=request))


def to_block(items: list[Item], key_type: pa.DataType) -> pa.Table:
    """The block of ``items``, whose keys are of ``key_type`` (int64 offsets or string ids)."""
    return pa.table(
        {
            "key": pa.array([item.key for item in items], key_type),
            "item": pa.array([pickle.dumps(item, protocol=5) for item in items], pa.large_binary()),
        }
    )


def from_block(block: pa.Table) -> list[Item]:
    return [pickle.loads(data) for data in block.column("item").to_pylist()]

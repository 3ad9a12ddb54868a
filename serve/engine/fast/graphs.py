"""The fast engine's CUDA graphs: each GPU step captured once per shape, then replayed.

A decode step or an admission launches hundreds of kernels; launched one by one from Python, their launch cost
dominates the device's work at small batches. Captured as a CUDA graph, a step replays with one launch. A graph
replays fixed kernels on fixed addresses, so its inputs and outputs are tensors that stay in place (the model
runner's input buffers and cache, and the output the capture allocated), and its shapes come from a few
buckets: a decode step's batch (:func:`batch_buckets`; and with SDPA the attended cache length, a multiple of
:data:`LENGTH_BUCKET`), an admission's rows (:func:`admission_buckets`) and prompt width (a multiple of
:data:`WIDTH_BUCKET`). A step is padded up to its bucket: a decode step's extra rows are slots with no step to
run, whose outputs nobody reads; an admission's extra rows write the cache's scratch slot, and its extra
columns sit after each prompt, where causal attention keeps them from the prompt's tokens. The graphs share one
memory pool.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial

import torch

from serve.engine.config import EngineConfig

log = logging.getLogger(__name__)

LENGTH_BUCKET = 32
"""Granularity of the attended cache length in an SDPA decode step."""
WIDTH_BUCKET = 8
"""Granularity of the prompt width of a captured admission (the brief caption's 71 tokens pad to 72; 80 with
16, a tenth more prefill for every admission of up to 32 requests)."""

GraphKey = tuple[str, int, int]
"""``("decode", batch, span)`` or ``("admit", rows, width)``."""


def batch_buckets(max_batch: int) -> list[int]:
    """Batch sizes that get their own graph: powers of two to 32, then multiples of 32, and the maximum.

    >>> batch_buckets(48)
    [1, 2, 4, 8, 16, 32, 48]
    >>> batch_buckets(200)
    [1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 200]
    """
    sizes = [size for size in (1, 2, 4, 8, 16, *range(32, max_batch, 32)) if size < max_batch]
    return [*sizes, max_batch]


def admission_buckets(limit: int) -> list[int]:
    """Row counts of captured admissions, up to ``limit``: 1, 2, 4, then steps of 4 to 64 and of about an eighth
    of the size above. A padding row costs a whole row of the admission's arithmetic: powers of two would pad 17
    requests to 32, and steps of a quarter of the size would pad the service's typical admission of 58 requests
    to 64 and admissions of 20 to 256 requests by 8.3% on average; these pad the latter by 4.0%, for twice the
    captures at start-up (34 graphs a prompt width for a limit of 256).

    >>> admission_buckets(300)  # doctest: +NORMALIZE_WHITESPACE
    [1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60, 64, 72, 80, 88, 96, 104, 112, 120, 128,
     144, 160, 176, 192, 208, 224, 240, 256, 288, 300]
    """
    sizes = [size for size in (1, 2, 4) if size < limit]
    size = 8
    while size < limit:
        sizes.append(size)
        size += max(4, 2 ** (size.bit_length() - 4))
    return [*sizes, limit]


class GraphCache:
    """The captured graphs by key, and the buckets that choose a step's shape (on the CPU too, where no graph is
    captured: the steps run at the same shapes)."""

    def __init__(self, config: EngineConfig, device: torch.device) -> None:
        slots = config.max_batch_size
        self.max_seq_len = config.max_seq_len
        self.batch_sizes = batch_buckets(slots)
        self.admission_rows = admission_buckets(min(config.graph_admission_rows, slots))
        """Row counts of captured admissions; the largest is also the most requests one admission chunk holds."""
        self.enabled = config.cuda_graphs and device.type == "cuda"
        self.pad_admissions = self.enabled
        """Whether admissions are padded to captured shapes; off for good once a capture fails."""
        self.captured: dict[GraphKey, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def decode_batch(self, highest_slot: int) -> int:
        """The rows of the decode step that runs slots ``[0, highest_slot]``: its batch bucket."""
        return next(b for b in self.batch_sizes if b > highest_slot)

    def decode_span(self, longest: int) -> int:
        """The cache positions an SDPA decode step attends over when its longest sequence holds ``longest``."""
        return min(-(-longest // LENGTH_BUCKET) * LENGTH_BUCKET, self.max_seq_len)

    def padded_width(self, width: int) -> int:
        """The prompt width of the captured admission that holds prompts of up to ``width`` tokens."""
        return min(-(-width // WIDTH_BUCKET) * WIDTH_BUCKET, self.max_seq_len)

    def admission_shape(self, count: int, width: int) -> tuple[int, int]:
        """Rows and width an admission of ``count`` prompts of up to ``width`` tokens runs at: a captured graph's
        when admissions are padded (``count`` is at most the largest row bucket), else its own."""
        if not self.pad_admissions:
            return count, width
        return next(size for size in self.admission_rows if size >= count), self.padded_width(width)

    def replay(self, key: GraphKey, forward: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Replay the graph recorded for ``key`` (recording it on first use) and return its output."""
        self.capture(key, forward)
        graph, output = self.captured[key]
        graph.replay()
        return output

    def capture(self, key: GraphKey, forward: Callable[[], torch.Tensor]) -> None:
        """Record ``forward`` as the graph of ``key``, unless it is recorded already."""
        if key in self.captured:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up kernels outside the graph, as CUDA graphs require
            forward()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = forward()
        self.pool = graph.pool()
        self.captured[key] = graph, output
        log.debug("captured %s graph batch=%d size=%d", *key)

    def clear(self) -> None:
        """Drop every graph and the pool (the layers they launch are being replaced)."""
        self.captured, self.pool = {}, None

    def capture_decodes(self, forward: Callable[[int, int], torch.Tensor]) -> None:
        """Capture the decode step ``forward(batch, 0)`` of every batch bucket (span 0: the Triton attention)."""
        for batch in self.batch_sizes:
            self.capture(("decode", batch, 0), partial(forward, batch, 0))

    def capture_admissions(self, forward: Callable[[int, int], torch.Tensor], widths: Iterable[int]) -> None:
        """Capture the admission ``forward(rows, width)`` of every row bucket at ``widths`` (padded). If one cannot
        be captured, admissions run eagerly from now on, unpadded."""
        padded = {self.padded_width(width) for width in widths}
        try:
            for width in sorted(padded):
                for rows in self.admission_rows:
                    self.capture(("admit", rows, width), partial(forward, rows, width))
        except Exception:
            log.exception("capturing the admission graphs failed; admissions run eagerly")
            self.pad_admissions = False

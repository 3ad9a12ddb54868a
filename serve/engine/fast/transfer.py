"""The fast engine's copies between host and device, arranged so that neither waits for the other.

On CUDA the host's buffers are page-locked, so that a copy from or to them runs on the device's stream without
blocking the host (from or to ordinary memory, the host waits for the copy):

- an admission chunk's pixels are stacked into :attr:`Transfer.staged_pixels` at the chunk's own offset, so the
  host can stack the next chunk while the device still copies the one before (:meth:`Transfer.stage`);
- a decode step's inputs go through one of two buffers in turn, as the device may still be reading the step
  before's when the host fills the next (:meth:`Transfer.send_step_inputs`);
- chosen tokens come back into :attr:`Transfer.host_tokens`, and an event recorded after the copy tells the host
  when they have landed (:meth:`Transfer.fetch`, :meth:`Transfer.wait`). The event is a blocking one: the
  waiting thread sleeps instead of spinning on a core the process's other threads could use.

On the CPU the same calls copy plainly.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from serve.engine.fast.runner import AdmissionInputs
from serve.engine.requests import GenerationRequest


@dataclass
class Staged:
    """An admission chunk's inputs on the host (:meth:`Transfer.stage`), at the shape it runs as."""

    pixels: torch.Tensor
    """Its requests' pixels, in the page-locked staging buffer: one row a request."""
    ids: np.ndarray
    """``[rows, width]`` prompt ids, padded with the pad id (``rows`` >= the requests when ``padded``)."""
    offsets: np.ndarray
    last: np.ndarray
    """Each row's image offset and last prompt position."""
    padded: bool
    """Padded to a captured graph's shape."""


class Transfer:
    """Host buffers for ``slots`` sequences, and the copies through them."""

    def __init__(self, slots: int, device: torch.device) -> None:
        pinned = device.type == "cuda"
        self.staged_pixels = torch.zeros((slots, 224, 224, 3), dtype=torch.uint8, pin_memory=pinned)
        self.host_tokens = torch.zeros(slots, dtype=torch.long, pin_memory=pinned)
        self.copied = torch.cuda.Event(blocking=True) if pinned else None
        """Recorded after each copy of tokens to the host (on CUDA)."""
        self.staged_inputs = [torch.zeros((2, slots), dtype=torch.long, pin_memory=pinned) for _ in range(2)]
        self.steps_sent = 0
        """Decode steps whose inputs were sent: step ``n`` goes through ``staged_inputs[n % 2]``."""
        self.device_wait_s = 0.0
        """Seconds the host has blocked in :meth:`wait` for the device (on CUDA)."""

    def stage(
        self, requests: Sequence[GenerationRequest], offset: int, shape: tuple[int, int], pad_id: int, padded: bool
    ) -> Staged:
        """The host's part of admitting ``requests`` as ``shape`` (rows, width): their prompts laid out, pad ids
        after each, and their pixels stacked at ``offset`` in the page-locked buffer (apart from those of an
        earlier chunk still copying)."""
        count, (rows, width) = len(requests), shape
        lengths = np.array([len(r.prompt_ids) for r in requests])
        ids = np.full((rows, width), pad_id, dtype=np.int64)
        offsets, last = np.zeros(rows, dtype=np.int64), np.zeros(rows, dtype=np.int64)
        for row, request in enumerate(requests):
            ids[row, : lengths[row]] = request.prompt_ids
            offsets[row], last[row] = request.image_offset, lengths[row] - 1
        pixels = self.staged_pixels[offset : offset + count]
        np.stack([r.pixels for r in requests], out=pixels.numpy())
        return Staged(pixels, ids, offsets, last, padded)

    def send_admission(self, staged: Staged, targets: np.ndarray, inputs: AdmissionInputs) -> None:
        """Copy a staged chunk, and each row's target slot, into the first rows of the admission's ``inputs``
        (the pixels without waiting, from page-locked memory on CUDA)."""
        count, (rows, width) = len(staged.pixels), staged.ids.shape
        inputs.pixels[:count].copy_(staged.pixels, non_blocking=True)
        inputs.ids[:rows, :width].copy_(torch.from_numpy(staged.ids))
        for buffer, values in ((inputs.offsets, staged.offsets), (inputs.last, staged.last), (inputs.slots, targets)):
            buffer[:rows].copy_(torch.from_numpy(values))

    def send_step_inputs(self, values: np.ndarray, inputs: torch.Tensor, batch: int) -> None:
        """Copy the first ``batch`` columns of ``values`` (the host's ``[2, slots]`` step inputs) into ``inputs``
        on the device without waiting, through this step's page-locked buffer."""
        staged = self.staged_inputs[self.steps_sent % 2]
        staged[:, :batch].copy_(torch.from_numpy(values[:, :batch]))
        inputs[:, :batch].copy_(staged[:, :batch], non_blocking=True)
        self.steps_sent += 1

    def fetch(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Start copying chosen tokens to the host (page-locked memory at ``offset``, on CUDA); returns them as
        given."""
        if self.copied is not None:
            self.host_tokens[offset : offset + len(tokens)].copy_(tokens, non_blocking=True)
            self.copied.record()
        return tokens

    def wait(self, tokens: torch.Tensor, offset: int = 0) -> np.ndarray:
        """The tokens fetched at ``offset``, on the host, once every fetch so far has landed (on CUDA the thread
        sleeps until then)."""
        if self.copied is None:
            return tokens.cpu().numpy()
        began = time.perf_counter()
        self.copied.synchronize()
        self.device_wait_s += time.perf_counter() - began
        return self.host_tokens[offset : offset + len(tokens)].numpy().copy()

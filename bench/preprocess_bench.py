"""Preprocessing benchmark: images per second per core of our image paths against the Hugging Face processor.

    python -m bench preprocess --out out/preprocess [--model DIR] [--images 32] [--duration 3]

Three paths take the same 640x480 JPEGs (synthetic photographs from ``bench.workload``), in the same run,
single-threaded (torch limited to one thread; PIL decodes and resizes on one), so the rates are per core:

- ``hf``: PIL decode, then the Kosmos-2 image processor (``load_processor(DIR).image_processor``): resize,
  rescale and normalize to float32 on the CPU;
- ``ours_exact``: ``serve.kosmos2.images.prepare_image`` with ``LimitsConfig().image_limits()``: decode, limit checks,
  squash-resize to 224x224 uint8 (the service normalizes later, on the GPU), the processor's pixels;
- ``ours_fast``: the same with ``LimitsConfig(fast_jpeg=True)``: JPEGs decoded at a reduced scale (libjpeg's
  DCT scaling, still at least 224x224) before the resize, so its pixels differ slightly from the exact path's.

Large allocations are kept off ``mmap`` first (:func:`steady_allocator`): otherwise glibc's allocator state
decides, from run to run, whether the processor's float arrays (about 4 MB an image) come back as fresh pages,
about 1,000 page faults an image that can slow the processor by a third and flatter any ratio against it. The
paths alternate in rounds until each has run ``--duration`` CPU seconds (a progress bar follows the slowest);
``summary.json``
holds each path's ``images_per_s_per_core`` and ``speedup_vs_hf``, and for ``ours_fast`` its deviation from
``ours_exact`` over every pixel of every image: ``pixel_mean_abs_diff`` and ``pixel_max_abs_diff``, in 0..255
levels. Without ``--model`` the tiny model's processor is used: it carries the real checkpoint's image settings.
"""

from __future__ import annotations

import ctypes
import io
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from bench.records import write_json
from bench.workload import WorkloadConfig, build_workload
from serve.app.config import LimitsConfig
from serve.engine.model import load_processor
from serve.kosmos2.images import prepare_image
from serve.provenance import provenance


@dataclass(frozen=True)
class PreprocessBenchConfig:
    """Which images and for how long: ``images`` distinct JPEGs at ``resolution``, ``duration_s`` per path."""

    model: str | None = None
    images: int = 32
    resolution: str = "640x480"
    duration_s: float = 3.0
    seed: int = 0


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc's ``mallopt`` parameters (malloc.h)."""


def steady_allocator() -> str:
    """Serve every allocation below 32 MiB from the heap and never give the heap back (glibc only); returns
    what was set, for the summary."""
    try:
        libc = ctypes.CDLL(None)
        done = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):
        done = 0
    return "glibc: mmap threshold 32 MiB, trim threshold 1 GiB" if done else "default (not glibc)"


def measure(work: Callable[[bytes], Any], images: Sequence[bytes]) -> float:
    """CPU seconds of this process (every thread) to run ``work`` once on each image: a library that used a
    second core would otherwise look faster per core than it is."""
    began = time.process_time()
    for data in images:
        work(data)
    return time.process_time() - began


def pixel_deviation(reference: Sequence[np.ndarray], other: Sequence[np.ndarray]) -> dict[str, float]:
    """Mean and largest absolute difference between two paths' uint8 pixels, in 0..255 levels, over every
    channel of every pixel of every image.

    >>> a, b = np.zeros((2, 2, 3), np.uint8), np.full((2, 2, 3), 2, np.uint8)
    >>> b[0, 0, 0] = 255
    >>> pixel_deviation([a], [b])
    {'pixel_mean_abs_diff': 23.083333333333332, 'pixel_max_abs_diff': 255.0}
    """
    diffs = np.concatenate([np.abs(x.astype(np.int16) - y.astype(np.int16)).ravel() for x, y in zip(reference, other)])
    return {"pixel_mean_abs_diff": float(diffs.mean()), "pixel_max_abs_diff": float(diffs.max())}


def run_preprocess_bench(config: PreprocessBenchConfig, out_dir: Path, progress: bool = True) -> dict[str, Any]:
    """Time the three paths on one thread and compare the fast path's pixels with the exact path's; writes
    ``summary.json`` to ``out_dir`` and returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workload = WorkloadConfig(
        resolutions={config.resolution: 1.0}, formats={"jpeg": 1.0}, seed=config.seed, pool_size=config.images
    )
    images = [item.image for item in build_workload(workload)]
    with tempfile.TemporaryDirectory() as scratch:
        model = config.model
        if model is None:
            from serve.kosmos2.tiny import write_tiny

            model = str(write_tiny(Path(scratch) / "tiny"))
        image_processor = load_processor(model).image_processor
    exact, fast = LimitsConfig().image_limits(), LimitsConfig(fast_jpeg=True).image_limits()
    paths: dict[str, Callable[[bytes], Any]] = {
        "hf": lambda data: image_processor(Image.open(io.BytesIO(data)).convert("RGB"))["pixel_values"],
        "ours_exact": lambda data: prepare_image(data, exact).pixels,
        "ours_fast": lambda data: prepare_image(data, fast).pixels,
    }
    allocator = steady_allocator()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for work in paths.values():
            work(images[0])  # first-call costs (imports, tables) stay out of the timing
        seconds = dict.fromkeys(paths, 0.0)
        counts = dict.fromkeys(paths, 0)
        bar = tqdm(total=config.duration_s, unit="s", desc="timed CPU seconds", disable=not progress)
        while min(seconds.values()) < config.duration_s:
            for name, work in paths.items():
                seconds[name] += measure(work, images)
                counts[name] += len(images)
            bar.n = round(min(min(seconds.values()), config.duration_s), 2)
            bar.refresh()
        bar.close()
    finally:
        torch.set_num_threads(threads)
    rates = {name: counts[name] / seconds[name] for name in paths}
    summary = {
        **provenance(asdict(config)),
        "kind": "preprocess",
        "allocator": allocator,
        "paths": {
            name: {
                "images_per_s_per_core": rates[name],
                "speedup_vs_hf": rates[name] / rates["hf"],
                "images": counts[name],
                "seconds": seconds[name],
            }
            for name in paths
        },
        "mean_jpeg_bytes": float(np.mean([len(data) for data in images])),
    }
    summary["paths"]["ours_fast"].update(
        pixel_deviation([paths["ours_exact"](data) for data in images], [paths["ours_fast"](data) for data in images])
    )
    write_json(out_dir / "summary.json", summary)
    return summary

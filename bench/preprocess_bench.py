"""Preprocessing benchmark: images per second per core of our image path against the Hugging Face processor.

    python -m bench preprocess --out out/preprocess [--model DIR] [--images 32] [--seconds 3]

Both paths take the same 640x480 JPEGs (synthetic photographs from ``bench.workload``), in the same run,
single-threaded (torch limited to one thread; PIL decodes and resizes on one), so the rates are per core:

- ``ours``: ``serve.images.prepare_image``: decode, limit checks, squash-resize to 224x224 uint8 (the
  service normalizes later, on the GPU);
- ``hf``: PIL decode, then the Kosmos-2 image processor (``load_processor(DIR).image_processor``): resize,
  rescale and normalize to float32 on the CPU.

The paths alternate in rounds until each has run ``seconds``; ``summary.json`` holds each path's
``images_per_s_per_core`` and ``speedup_vs_hf``. Without ``--model`` the tiny model's processor is used: it
carries the real checkpoint's image settings.
"""

from __future__ import annotations

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

from bench.provenance import provenance
from bench.records import write_json
from bench.workload import WorkloadConfig, build_workload
from serve.config import LimitsConfig
from serve.images import prepare_image
from serve.model import load_processor


@dataclass(frozen=True)
class PreprocessBenchConfig:
    """Which images and for how long: ``images`` distinct JPEGs at ``resolution``, ``seconds`` per path."""

    model: str | None = None
    images: int = 32
    resolution: str = "640x480"
    seconds: float = 3.0
    seed: int = 0


def measure(work: Callable[[bytes], Any], images: Sequence[bytes]) -> float:
    """Seconds to run ``work`` once on each image."""
    began = time.perf_counter()
    for data in images:
        work(data)
    return time.perf_counter() - began


def run_preprocess_bench(config: PreprocessBenchConfig, out_dir: Path) -> dict[str, Any]:
    """Time both paths on one thread; writes ``summary.json`` to ``out_dir`` and returns it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    workload = WorkloadConfig(
        resolutions={config.resolution: 1.0}, formats={"jpeg": 1.0}, seed=config.seed, pool_size=config.images
    )
    images = [item.image for item in build_workload(workload)]
    with tempfile.TemporaryDirectory() as scratch:
        model = config.model
        if model is None:
            from serve.tiny import write_tiny

            model = str(write_tiny(Path(scratch) / "tiny"))
        image_processor = load_processor(model).image_processor
    limits = LimitsConfig().image_limits()
    paths: dict[str, Callable[[bytes], Any]] = {
        "ours": lambda data: prepare_image(data, limits).pixels,
        "hf": lambda data: image_processor(Image.open(io.BytesIO(data)).convert("RGB"))["pixel_values"],
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for work in paths.values():
            work(images[0])  # first-call costs (imports, tables) stay out of the timing
        seconds = dict.fromkeys(paths, 0.0)
        counts = dict.fromkeys(paths, 0)
        while min(seconds.values()) < config.seconds:
            for name, work in paths.items():
                seconds[name] += measure(work, images)
                counts[name] += len(images)
    finally:
        torch.set_num_threads(threads)
    rates = {name: counts[name] / seconds[name] for name in paths}
    summary = {
        **provenance(asdict(config)),
        "kind": "preprocess",
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
    write_json(out_dir / "summary.json", summary)
    return summary

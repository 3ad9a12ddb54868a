"""Test images (smooth, photograph-like pictures in any format), and Triton kernels run by its interpreter."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from serve.app.config import LimitsConfig

LIMITS = LimitsConfig().image_limits()
"""The service's default image limits."""


def run_interpreted(script: str, out: Path, *args: str) -> Any:
    """Run ``script``, which saves its results to the path in ``sys.argv[1]`` with ``torch.save`` (``args``
    follow it), in a fresh process where Triton's interpreter runs the kernels on the CPU (``TRITON_INTERPRET=1``
    must hold before Triton decorates them); returns what it saved. Skips the test without Triton 3.9 or later: older
    interpreters (Triton 3.6 with numpy 2.5) fail to take a loaded scalar as a loop's bound."""
    pytest.importorskip("triton", minversion="3.9")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", script, str(out), *args], cwd=root, env=env, check=True, timeout=300)
    return torch.load(out)


def photo(width: int = 320, height: int = 240, seed: int = 0) -> Image.Image:
    """A smooth, photograph-like RGB test image (gradients and a disc, plus a little noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy, r = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height, min(width, height) / 4
    disc = ((x - cx) ** 2 + (y - cy) ** 2 < r**2).astype(np.float32)
    base = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin(x / 17.0)], axis=-1) * 200
    base += disc[..., None] * rng.uniform(-80, 80, size=3)
    base += rng.normal(0, 6, size=base.shape)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG that declares a size but holds almost no data: a decompression bomb's shape."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")

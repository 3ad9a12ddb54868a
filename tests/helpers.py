"""What several test modules share: test images (smooth, photograph-like pictures in any format, one shape on a
plain background), engine requests and a recording sink, eval output checks, and Triton kernels run by its
interpreter."""

from __future__ import annotations

import asyncio
import io
import json
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from eval.refexp import wilson_interval
from serve.app.client import chat_request
from serve.app.config import LimitsConfig
from serve.engine.requests import GenerationRequest, SamplingParams, TokenLogprobs
from serve.kosmos2.images import prepare_image
from serve.kosmos2.tasks import Task, build_prompt

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


def shape_image(
    width: int,
    height: int,
    box: tuple[int, int, int, int],
    colour: tuple[int, int, int] = (230, 20, 20),
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """An RGB ellipse that fills ``box`` (x1, y1, x2, y2: pixel edges, x2 and y2 excluded) on a plain background."""
    image = Image.new("RGB", (width, height), background)
    ImageDraw.Draw(image).ellipse((box[0], box[1], box[2] - 1, box[3] - 1), fill=colour)
    return image


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two boxes (x1, y1, x2, y2)."""
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


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


QUESTIONS = [
    "what is this?",
    "where",
    "is the small red circle on the left of the big blue square near the tree?",
    "x",
    "two cats sitting on a mat",
    "what colour is the car next to the building on the right?",
    "who",
    "how many people are standing in front of the bus?",
]


def requests_for(codec, params: list[SamplingParams]) -> list[GenerationRequest]:
    out = []
    for i, p in enumerate(params):
        task = [Task.VQA, Task.GROUND, Task.CAPTION, Task.DETAILED_CAPTION][i % 4]
        text = QUESTIONS[i % len(QUESTIONS)] if task in (Task.VQA, Task.GROUND) else None
        pixels = prepare_image(encode(photo(160 + 7 * i, 120, seed=100 + i)), LIMITS).pixels
        out.append(GenerationRequest(pixels, codec.encode(build_prompt(task, text).text), p))
    return out


class Recorder:
    """A streaming sink that records every token it is given, and their log-probabilities when given."""

    streaming = True

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.logprobs = TokenLogprobs()
        self.result = None

    def tokens(self, token_ids, logprobs=None):
        self.seen.extend(token_ids)
        if logprobs is not None:
            self.logprobs.extend(logprobs)

    def finish(self, result):
        self.result = result

    def fail(self, error):
        raise error


def read_outputs(out: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return lines, json.loads((out / "summary.json").read_text())


def check_consistent(out: Path, n: int) -> tuple[list[dict], dict]:
    """The files of one run agree: one line per expression, the summary their mean, the report and image made."""
    lines, summary = read_outputs(out)
    assert len(lines) == n == summary["n"] and len({line["id"] for line in lines}) == n
    assert summary["correct"] == sum(line["correct"] for line in lines)
    assert summary["accuracy"] == pytest.approx(summary["correct"] / n)
    assert summary["any_box_correct"] == sum(line["any_box_correct"] for line in lines)
    assert summary["no_box"] == sum(line["no_box"] for line in lines)
    assert sum(s["n"] for s in summary["per_split"]) == n
    for line in lines:
        assert line["correct"] == (line["iou"] >= 0.5) and line["any_box_iou"] >= line["iou"]
        assert line["no_box"] == (not line["pred_boxes"])
    assert summary["no_box"] == summary["phrase_mismatch"] + summary["no_object"]
    assert summary["no_object"] == sum(line["no_object"] for line in lines)
    assert summary["schema_version"] == 3 and summary["versions"]["python"]
    assert summary["accuracy_ci95"] == list(wilson_interval(summary["correct"], n))
    assert all(s["accuracy_ci95"] == list(wilson_interval(s["correct"], s["n"])) for s in summary["per_split"])
    report = (out / "report.md").read_text()
    assert "52.32" in report and "56.3" in report and f"{100 * summary['accuracy']:.2f}%" in report
    low, high = summary["accuracy_ci95"]
    assert f"95% interval {100 * low:.2f}–{100 * high:.2f}%" in report
    assert (out / "examples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return lines, summary


LOAD_IMAGE = encode(photo(96, 72), "PNG")
"""The small image of the load tests' requests."""


def body(**fields) -> dict:
    """A brief-caption request of at most 12 tokens, with ``fields`` on top."""
    return chat_request(LOAD_IMAGE, **{"task": "caption", "max_tokens": 12, **fields})


async def storm(url: str, clients: int, seconds: float, **fields) -> list[tuple[int, float, dict]]:
    """``clients`` loops sending requests for ``seconds``; returns (status, latency, headers) of each."""
    results: list[tuple[int, float, dict]] = []
    deadline = time.monotonic() + seconds
    async with httpx.AsyncClient(timeout=60) as client:

        async def loop() -> None:
            while time.monotonic() < deadline:
                sent = time.monotonic()
                try:
                    response = await client.post(f"{url}/v1/chat/completions", json=body(**fields))
                    results.append((response.status_code, time.monotonic() - sent, dict(response.headers)))
                    if response.status_code == 200:
                        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
                    else:
                        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
                except httpx.HTTPError as exc:
                    results.append((0, time.monotonic() - sent, {"error": repr(exc)}))

        await asyncio.gather(*(loop() for _ in range(clients)))
    return results

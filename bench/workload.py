"""The bench workload: which images, at what size and encoding, with which task, reproducible from a seed.

A workload is a pool of :class:`WorkItem` s drawn once, before any timing starts (encoding a 1080p JPEG
costs more than some requests), and sent in order, cycling: request ``i`` of every load point is item
``i % len(pool)``, so every point of a sweep sends the same sequence. Image sources:

- ``synthetic``: photograph-like pictures (smooth shapes and gradients, sensor noise) at the resolution
  buckets asked for, encoded as JPEG or PNG with the probabilities asked for;
- ``photos``: the project's sample photographs (astronaut, chelsea the cat, coffee, rocket ...,
  ``serve.app.shipped``), resized to the buckets and encoded the same way;
- a folder: its image files sent as they are (buckets and formats do not apply).

Tasks (caption, detailed_caption, vqa, ground) are drawn with their probabilities; vqa and ground draw a
question or an expression from fixed lists. Decoding is greedy with at most ``max_tokens`` new tokens, or
exactly that many with ``ignore_eos`` (the fixed-length benchmark: the end token does not stop generation).
``python -m bench run --help`` shows the options.

    >>> pool = build_workload(WorkloadConfig(resolutions={"64x48": 1.0}, tasks={"vqa": 1.0}, pool_size=3))
    >>> [(item.width, item.height, item.task) for item in pool]
    [(64, 48, 'vqa'), (64, 48, 'vqa'), (64, 48, 'vqa')]
    >>> pool[0].image == build_workload(WorkloadConfig(resolutions={"64x48": 1.0}, tasks={"vqa": 1.0}))[0].image
    True
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from serve.app.shipped import PHOTOS, photo

TASKS = ("caption", "detailed_caption", "vqa", "ground")
"""Tasks a workload may mix (the service's ``describe_region`` and ``raw`` need inputs a bench cannot guess)."""

FORMATS = {"jpeg": "JPEG", "png": "PNG"}
"""Encodings a workload may mix, by the name used on the command line."""

QUESTIONS = (
    "What is in the picture?",
    "What colour is the largest object?",
    "How many objects are there?",
    "Where was this photo taken?",
    "What is the person holding?",
)
EXPRESSIONS = ("the cat", "a person", "the object in the middle", "the sky", "a red circle on the left")

FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")


@dataclass(frozen=True)
class WorkloadConfig:
    """What to send. ``source``: ``synthetic``, ``photos`` or a folder of images. Mixes map a choice to its
    probability (weights are normalized). ``pool_size`` distinct items are drawn and then cycled."""

    source: str = "synthetic"
    resolutions: dict[str, float] = field(default_factory=lambda: {"640x480": 0.5, "1280x720": 0.3, "1920x1080": 0.2})
    formats: dict[str, float] = field(default_factory=lambda: {"jpeg": 0.8, "png": 0.2})
    tasks: dict[str, float] = field(
        default_factory=lambda: {"caption": 0.4, "detailed_caption": 0.2, "vqa": 0.2, "ground": 0.2}
    )
    max_tokens: int = 64
    ignore_eos: bool = False
    seed: int = 0
    pool_size: int = 64
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        for choice in self.tasks:
            if choice not in TASKS:
                raise ValueError(f"unknown task {choice!r}; choose among {', '.join(TASKS)}")
        for choice in self.formats:
            if choice not in FORMATS:
                raise ValueError(f"unknown image format {choice!r}; choose among {', '.join(FORMATS)}")
        for choice in self.resolutions:
            parse_resolution(choice)
        for mix in (self.resolutions, self.formats, self.tasks):
            probabilities(mix)
        if self.max_tokens < 1 or self.pool_size < 1:
            raise ValueError("max_tokens and pool_size must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class WorkItem:
    """One request's input: the encoded image, its size, the task and its text, and the token limit."""

    index: int
    image: bytes = field(repr=False)
    image_name: str
    width: int
    height: int
    task: str
    text: str | None
    max_tokens: int
    ignore_eos: bool = False

    def request_fields(self) -> dict[str, Any]:
        """Keyword arguments of ``KosmosClient.complete`` / ``stream`` besides the image (greedy decoding;
        with ``ignore_eos``, exactly ``max_tokens`` new tokens)."""
        fields = {"task": self.task, "text": self.text, "max_tokens": self.max_tokens, "temperature": 0.0}
        return {**fields, "ignore_eos": True} if self.ignore_eos else fields


def parse_mix(text: str) -> dict[str, float]:
    """``"a:3,b:1"`` -> ``{"a": 3.0, "b": 1.0}``; a bare name weighs 1.

    >>> parse_mix("caption:0.75, vqa:0.25")
    {'caption': 0.75, 'vqa': 0.25}
    >>> parse_mix("640x480")
    {'640x480': 1.0}
    """
    mix: dict[str, float] = {}
    for part in text.split(","):
        name, _, weight = part.strip().partition(":")
        if not name:
            raise ValueError(f"empty choice in {text!r}; write name:weight,name:weight")
        mix[name] = float(weight) if weight else 1.0
    return mix


def probabilities(mix: dict[str, float]) -> np.ndarray:
    """The mix's weights normalized to sum to 1; weights must be non-negative with a positive sum.

    >>> probabilities({"a": 3, "b": 1}).tolist()
    [0.75, 0.25]
    """
    weights = np.array(list(mix.values()), dtype=np.float64)
    if not len(weights) or (weights < 0).any() or weights.sum() <= 0:
        raise ValueError(f"a mix needs non-negative weights with a positive sum, got {mix}")
    return weights / weights.sum()


def parse_resolution(text: str) -> tuple[int, int]:
    """``"1280x720"`` -> ``(1280, 720)``.

    >>> parse_resolution("1280x720")
    (1280, 720)
    """
    width, sep, height = text.lower().partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or int(width) < 1 or int(height) < 1:
        raise ValueError(f"a resolution is WIDTHxHEIGHT in pixels, e.g. 1280x720; got {text!r}")
    return int(width), int(height)


def build_workload(config: WorkloadConfig) -> list[WorkItem]:
    """The pool of ``config.pool_size`` items, the same for the same config (the seed included)."""
    rng = np.random.default_rng(config.seed)
    folder = None if config.source in ("synthetic", "photos") else folder_images(config.source)
    items = []
    for index in range(config.pool_size):
        task = _draw(rng, config.tasks)
        text = (
            str(rng.choice(QUESTIONS)) if task == "vqa" else str(rng.choice(EXPRESSIONS)) if task == "ground" else None
        )
        if folder is not None:
            path = folder[int(rng.integers(len(folder)))]
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
            name = path.name
        else:
            width, height = parse_resolution(_draw(rng, config.resolutions))
            fmt = _draw(rng, config.formats)
            if config.source == "photos":
                name = PHOTOS[int(rng.integers(len(PHOTOS)))]
                picture = sample_photo(name).resize((width, height), Image.Resampling.BICUBIC)
            else:
                name = f"synthetic-{index}"
                picture = synthetic_photo(width, height, rng)
            data = encode(picture, fmt, config.jpeg_quality)
            name = f"{name}.{fmt}"
        items.append(WorkItem(index, data, name, width, height, task, text, config.max_tokens, config.ignore_eos))
    return items


def _draw(rng: np.random.Generator, mix: dict[str, float]) -> str:
    return list(mix)[int(rng.choice(len(mix), p=probabilities(mix)))]


def folder_images(folder: str | Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"the image source {str(folder)!r} is neither synthetic, photos nor a folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in FILE_SUFFIXES)
    if not files:
        raise ValueError(f"the folder {str(folder)!r} holds no image files ({', '.join(FILE_SUFFIXES)})")
    return files


def sample_photo(name: str) -> Image.Image:
    """One of the project's sample photographs (``serve.app.shipped.PHOTOS``), decoded."""
    with Image.open(io.BytesIO(photo(name))) as image:
        return image.convert("RGB")


def synthetic_photo(width: int, height: int, rng: np.random.Generator) -> Image.Image:
    """A photograph-like RGB picture: smooth gradients and soft shapes drawn small, upscaled, plus sensor
    noise at full resolution (so that JPEG and PNG sizes resemble a camera's)."""
    small_w, small_h = max(8, width // 8), max(8, height // 8)
    y, x = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    top, bottom = rng.uniform(40, 220, size=(2, 3))
    canvas = top + (bottom - top) * (y / small_h)[..., None]
    for _ in range(int(rng.integers(3, 8))):
        cx, cy = rng.uniform(0, small_w), rng.uniform(0, small_h)
        radius = rng.uniform(0.05, 0.3) * min(small_w, small_h)
        weight = np.clip(1.5 - np.hypot(x - cx, y - cy) / radius, 0, 1)[..., None]
        canvas = canvas * (1 - weight) + rng.uniform(0, 255, size=3) * weight
    small = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8))
    pixels = np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    noise = rng.integers(-6, 7, size=pixels.shape, dtype=np.int16)
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def encode(image: Image.Image, fmt: str, jpeg_quality: int = 90) -> bytes:
    """``image`` encoded as ``jpeg`` or ``png``."""
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, "JPEG", quality=jpeg_quality)
    else:
        image.save(buffer, FORMATS[fmt])
    return buffer.getvalue()

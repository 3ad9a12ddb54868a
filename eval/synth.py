"""A synthetic RefCOCO-style set: scenes of coloured shapes with unambiguous referring expressions.

``python -m eval synth --out DIR --n 500 --seed 0`` draws scenes of two to four shapes (colour, kind, size,
position) on a smooth background, images of varied size and aspect ratio, and for one or two shapes of each
scene an expression such as "the small red circle on the left". No two shapes of a scene share colour and
kind, so every expression names exactly one shape; size and position words are true of it. Small shapes go
down to a few pixels, where Kosmos-2's 32x32 location grid cannot reach IoU 0.5, so the grid's ceiling
(``--predictor ceiling``) is below 100% as on real data.

It writes ``DIR/images/*.png`` and ``DIR/finetune_synth_{split}.json`` in MDETR's format, so the same loader
reads it: ``python -m eval run --annotations DIR/finetune_synth_val.json --images DIR/images ...``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 205, 30),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
KINDS = ("circle", "square", "triangle", "star")
SIZES = {"small": (0.05, 0.16), "large": (0.26, 0.42)}
"""Side of a shape's box as a fraction of the image's shorter side."""


@dataclass(frozen=True)
class Shape:
    """One drawn shape and its box ``(x1, y1, x2, y2)`` in pixels (the pixels it covers are x1..x2-1)."""

    colour: str
    kind: str
    size: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class Scene:
    """An image's size and shapes."""

    width: int
    height: int
    shapes: list[Shape]


def random_scene(rng: np.random.Generator) -> Scene:
    """Two to four non-overlapping shapes, no two of the same colour and kind, on a random-size canvas."""
    width, height = int(rng.integers(256, 513)), int(rng.integers(192, 449))
    wanted = int(rng.integers(2, 5))
    kinds = [(c, k) for c in COLOURS for k in KINDS]
    order = rng.permutation(len(kinds))
    shapes: list[Shape] = []
    for index in order[: wanted * 4]:
        if len(shapes) == wanted:
            break
        colour, kind = kinds[index]
        size = "small" if rng.random() < 0.5 else "large"
        low, high = SIZES[size]
        side = max(4, round(rng.uniform(low, high) * min(width, height)))
        x1, y1 = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        box = (x1, y1, x1 + side, y1 + side)
        if all(_apart(box, other.box, margin=4) for other in shapes):
            shapes.append(Shape(colour, kind, size, box))
    return Scene(width, height, shapes)


def describe(shape: Shape, width: int, rng: np.random.Generator) -> str:
    """A referring expression for ``shape``: colour and kind always, size and position words sometimes.

    >>> describe(Shape("red", "circle", "small", (0, 0, 10, 10)), 100, np.random.default_rng(3))
    'the small red circle on the left'
    """
    centre = (shape.box[0] + shape.box[2]) / 2
    where = "on the left" if centre < width / 3 else "on the right" if centre > 2 * width / 3 else "in the middle"
    words = ["the"] + ([shape.size] if rng.random() < 0.7 else []) + [shape.colour, shape.kind]
    if rng.random() < 0.7:
        words.append(where)
    return " ".join(words)


def draw(scene: Scene) -> Image.Image:
    """The scene as an RGB image: a smooth grey-blue gradient with the shapes on it."""
    y, x = np.mgrid[0 : scene.height, 0 : scene.width].astype(np.float32)
    base = 120 + 50 * (x / scene.width)[..., None] * np.array([0.6, 0.8, 1.0]) + 30 * (y / scene.height)[..., None]
    image = Image.fromarray(base.clip(0, 255).astype(np.uint8))
    pen = ImageDraw.Draw(image)
    for shape in scene.shapes:
        x1, y1, x2, y2 = shape.box
        fill = COLOURS[shape.colour]
        if shape.kind == "circle":
            pen.ellipse((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif shape.kind == "square":
            pen.rectangle((x1, y1, x2 - 1, y2 - 1), fill=fill)
        elif shape.kind == "triangle":
            pen.polygon([(x1, y2 - 1), (x2 - 1, y2 - 1), ((x1 + x2 - 1) / 2, y1)], fill=fill)
        else:
            pen.polygon(_star(shape.box), fill=fill)
    return image


def write_synthetic(out: str | Path, n: int, seed: int = 0, split: str = "val") -> Path:
    """Draw scenes until ``n`` expressions exist; write images and the MDETR file; return the file's path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": kind, "supercategory": "shape"} for i, kind in enumerate(KINDS)]
    entries: list[dict] = []
    annotations: list[dict] = []
    scene_index = 0
    while len(entries) < n:
        scene = random_scene(rng)
        file_name = f"synth_{split}_{scene_index:06d}.png"
        draw(scene).save(out / "images" / file_name)
        targets = rng.permutation(len(scene.shapes))[: int(rng.integers(1, 3))]
        for target in targets[: n - len(entries)]:
            shape = scene.shapes[target]
            expression = describe(shape, scene.width, rng)
            x1, y1, x2, y2 = shape.box
            entry_id = len(entries)
            entries.append(
                {
                    "file_name": file_name,
                    "height": scene.height,
                    "width": scene.width,
                    "id": entry_id,
                    "original_id": scene_index,
                    "caption": expression,
                    "dataset_name": "synth",
                    "tokens_negative": [[0, len(expression)]],
                }
            )
            annotations.append(
                {
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                    "image_id": entry_id,
                    "category_id": KINDS.index(shape.kind) + 1,
                    "id": entry_id,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "original_id": entry_id,
                    "tokens_positive": [[0, len(expression)]],
                }
            )
        scene_index += 1
    path = out / f"finetune_synth_{split}.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return path


def _apart(a: tuple[int, ...], b: tuple[int, ...], margin: int) -> bool:
    return a[2] + margin <= b[0] or b[2] + margin <= a[0] or a[3] + margin <= b[1] or b[3] + margin <= a[1]


def _star(box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    """A five-pointed star whose points touch all four sides of ``box`` (less one pixel)."""
    x1, y1, x2, y2 = box
    angles = [-math.pi / 2 + i * math.pi / 5 for i in range(10)]
    radii = [1.0 if i % 2 == 0 else 0.45 for i in range(10)]
    xs = [r * math.cos(a) for r, a in zip(radii, angles)]
    ys = [r * math.sin(a) for r, a in zip(radii, angles)]
    sx, sy = (x2 - 1 - x1) / (max(xs) - min(xs)), (y2 - 1 - y1) / (max(ys) - min(ys))
    return [(x1 + (px - min(xs)) * sx, y1 + (py - min(ys)) * sy) for px, py in zip(xs, ys)]

"""``examples.png``: a grid of scored expressions with the ground-truth and predicted boxes drawn.

Each panel shows the image as the annotation sizes it (no EXIF rotation, like the official pipeline), the
ground-truth box in green, the scored (first) predicted box in red, other boxes under the same phrase in orange
dots, and as the title the expression, its IoU and verdict (red for a failure) and the start of the answer's
text. A panel without a box says so inside the image, and whether the answer had boxes under other phrases
(drawn in cyan dots) or none at all. Failures fill up to half of the grid.
It runs as part of ``python -m eval run`` (matplotlib's object API, which renders with Agg and leaves pyplot's
global state alone).
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from eval.datasets import RefExample
from eval.records import PredictionRecord
from serve.kosmos2.grounding import to_pixels

COLUMNS = 4


def pick(records: Sequence[PredictionRecord], count: int) -> list[int]:
    """Indices of the records to show, in dataset order: failures first up to half, then successes.

    >>> from types import SimpleNamespace as R
    >>> pick([R(correct=c) for c in (True, False, True, False, False, True)], 4)
    [1, 3, 0, 2]
    """
    failures = [i for i, r in enumerate(records) if not r.correct]
    successes = [i for i, r in enumerate(records) if r.correct]
    chosen_failures = failures[: max(count // 2, count - len(successes))]
    return chosen_failures + successes[: count - len(chosen_failures)]


def draw_examples(
    examples: Sequence[RefExample], records: Sequence[PredictionRecord], path: str | Path, count: int = 16
) -> None:
    """Draw up to ``count`` examples (``records[i]`` scores ``examples[i]``) into one PNG at ``path``."""
    chosen = pick(records, count)
    rows = max(1, -(-len(chosen) // COLUMNS))
    figure = Figure(figsize=(4 * COLUMNS, 4 * rows))
    axes = figure.subplots(rows, COLUMNS, squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, index in zip(axes.flat, chosen):
        _panel(axis, examples[index], records[index])
    figure.suptitle(
        "green: ground truth, red dashed: first predicted box, orange: other boxes of the phrase, "
        "cyan: boxes under other phrases; > the answer's text"
    )
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    figure.savefig(path, dpi=80)


def _panel(axis: Axes, example: RefExample, record: PredictionRecord) -> None:
    """One example: the image, its boxes, a label when there is no box, and the title."""
    with Image.open(io.BytesIO(example.read_image())) as image:
        axis.imshow(image.convert("RGB"), extent=(0, example.width, example.height, 0))
    axis.set_xlim(0, example.width)
    axis.set_ylim(example.height, 0)
    _box(axis, record.gt_box, "lime", "-", 2.5)
    for k, box in enumerate(record.pred_boxes):
        _box(axis, box, "red" if k == 0 else "orange", "--" if k == 0 else ":", 2.0 if k == 0 else 1.2)
    if record.phrase_mismatch:
        for entity in record.entities:
            for box in entity.boxes:
                _box(axis, to_pixels(box, example.width, example.height), "cyan", ":", 1.5)
    if record.no_box:
        axis.text(
            0.5,
            0.03,
            verdict(record).upper(),
            transform=axis.transAxes,
            ha="center",
            va="bottom",
            fontsize=12,
            color="firebrick",
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "firebrick"},
        )
    shown = math.floor(record.iou * 1000) / 1000  # rounded down, so 0.4997 does not read as 0.500
    answer = textwrap.shorten(record.error or record.text, 44, placeholder="...") or "(empty)"
    title = f"{textwrap.fill(record.expression, 40)}\nIoU {shown:.3f}: {verdict(record)}\n> {answer}"
    axis.set_title(title, fontsize=9, color="darkgreen" if record.correct else "firebrick")


def verdict(record: PredictionRecord) -> str:
    """What became of one expression, telling the two kinds of "no box" apart.

    >>> from types import SimpleNamespace as R
    >>> [verdict(R(error=None, correct=c, no_box=n, phrase_mismatch=m)) for c, n, m in
    ...  [(True, False, False), (False, False, False), (False, True, True), (False, True, False)]]
    ['correct', 'wrong', 'no box: other phrase', 'no box: no object']
    """
    if record.error:
        return "error"
    if record.correct:
        return "correct"
    if not record.no_box:
        return "wrong"
    return "no box: other phrase" if record.phrase_mismatch else "no box: no object"


def _box(axis: Axes, box: Sequence[float], colour: str, style: str, width: float) -> None:
    x1, y1, x2, y2 = box
    axis.add_patch(
        Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=colour, linestyle=style, linewidth=width)
    )

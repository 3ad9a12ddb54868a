"""The official Kosmos-2 referring-expression protocol (RefCOCO, RefCOCO+, RefCOCOg), as pure functions.

Everything here reproduces unilm's ``kosmos-2/evaluation/refcoco/refexp_evaluate.py`` (with its helpers
``flickr_entities/decode_string.py`` and ``refcoco/box_ops.py``, the inputs ``refcoco/cook_data.py`` builds and
the generation flags of ``grd-zeroshot-refcoco.sh``), quirks included. Nothing here runs a model: a predictor
gives the text's entities, :func:`score` says whether the expression was found. Run it through
``python -m eval run`` (see ``eval/__main__.py``).

The protocol and its quirks, with where each comes from:

1. Prompt ``<grounding><phrase> {expression}</phrase>`` after the image (``cook_data.py`` writes
   ``<grounding><phrase>{caption}</phrase>``; its sentencepiece encoding puts the word boundary ``▁`` before the
   first word, which is the space here). Greedy (``--beam 1``), ``--no-repeat-ngram-size 3``, 32x32 location
   bins (``--location-bin-size 32``), and up to ``--max-len-b 500`` tokens (we stop at ``max_tokens``, 64 by
   default: the first box follows the phrase at once, so only the any-box bound can move with more tokens).
2. Boxes are parsed from the answer with the regular expression of ``decode_string.py`` (what
   ``serve.kosmos2.grounding.extract_entities`` uses too) and decoded to cell centres, or to whole cells when the two
   corners share a row or column. A corner pair in the wrong order is decoded as written (x2 < x1 is possible).
3. Only entities whose phrase, stripped, equals the expression, stripped, count (``refexp_evaluate.py``:
   ``p_pred.strip() != caption.strip()``). The match is exact and case-sensitive, against the expression as the
   annotation file spells it, so any change the tokenizer's round trip makes to the phrase (collapsed spaces,
   NFKC, an unknown character) turns a box into "no box"; answers are therefore decoded without transformers'
   clean-up of tokenization spaces (``serve.kosmos2.text``), which would turn "man , left" into "man, left".
   Objects the model writes without a phrase never match.
4. The boxes of every matching entity are collected in text order, each entity's boxes in order
   (``</delimiter_of_multi_objects/>``). Accuracy uses the first (``iou[0, :1]``); the "upper bound" takes any
   of them (``max(iou)``). The official script also prints a "mean box" score, not reproduced here.
5. Normalized boxes are scaled by the width and height in the annotation (``p_x1 * img_width`` ...), not by
   the decoded image's size, and never clipped. The official pipeline opens images without applying EXIF
   orientation (``caption_obj_few_shot.py``: ``Image.open(path).convert("RGB")``) while our service applies it;
   COCO images with a rotation tag therefore reach the model turned, which this package cannot undo.
6. Ground truth: COCO ``[x, y, w, h]`` becomes ``[x, y, x + w, y + h]``, no +1 and no clipping.
7. IoU on continuous coordinates, areas ``(x2 - x1) * (y2 - y1)`` with no +1 pixel (``box_ops.box_iou``),
   intersection clamped at 0, computed in float32 (torch's default dtype, which ``torch.as_tensor`` of Python
   floats gives), so ties at the threshold fall as they do there. A prediction is correct when IoU >= 0.5.
8. No matching box counts as a 0-area box ``[0, 0, 0, 0]``: IoU 0, wrong. Where the official division is
   0/0 (both boxes empty, or an inverted box) it yields NaN or 0, wrong either way; :func:`iou` returns 0.
   Not in the official script, for diagnosis only: a "no box" answer is a *phrase mismatch* when it holds
   boxes under other phrases (or under none), and *no object* when it holds no box at all.
9. Bookkeeping quirks not reproduced because they cannot change a score: the official script pairs the
   i-th image entry with the i-th annotation (it checks their ids, as ``eval.datasets.load_mdetr`` does), stops
   early when the prediction file is shorter than the annotations (scoring only the prefix), knows only the
   names ``refcoco``, ``refcoco+`` and ``refcocog``, and prints its three scores ``sorted()``, so the printed
   labels ("Precision @ 1, mean, all") need not match the numbers' order.

    >>> entities = [PredictedEntity("the dog", [(0.0, 0.0, 0.5, 0.5)])]
    >>> s = score("the dog ", (0.0, 0.0, 100.0, 50.0), entities, width=200, height=100)
    >>> s.iou, s.correct, s.boxes_px
    (1.0, True, [(0.0, 0.0, 100.0, 50.0)])
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from serve.kosmos2.grounding import Box, to_pixels

IOU_THRESHOLD = 0.5
"""A prediction is correct at IoU >= this (``thresh_iou=0.5``)."""

NO_BOX: Box = (0.0, 0.0, 0.0, 0.0)
"""What the official script scores when no box matches the expression."""

Z_95 = 1.959963984540054
"""The standard normal quantile of a two-sided 95% interval."""


@dataclass(frozen=True)
class PredictedEntity:
    """A phrase of the model's answer and its boxes, normalized to [0, 1] as the model writes them.

    ``span`` (the phrase's character offsets in the answer's clean text) and ``boxes_px`` (the boxes in pixels of
    the image as the predictor decoded it) are kept as the predictor returned them, for diagnosis; scoring uses
    neither, since the protocol scales ``boxes`` by the annotation's width and height.
    """

    phrase: str
    boxes: list[Box]
    span: tuple[int, int] | None = None
    boxes_px: list[Box] | None = None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PredictedEntity:
        """An entity from the service's JSON (``phrase``, ``span``, ``boxes``, ``boxes_px``) or a stored record's.

        >>> PredictedEntity.from_json({"phrase": "a dog", "span": [0, 5], "boxes": [[0, 0, 0.5, 1]]})
        PredictedEntity(phrase='a dog', boxes=[(0.0, 0.0, 0.5, 1.0)], span=(0, 5), boxes_px=None)
        """
        span, boxes_px = data.get("span"), data.get("boxes_px")
        return cls(
            data["phrase"],
            [_box(b) for b in data["boxes"]],
            (int(span[0]), int(span[1])) if span is not None else None,
            [_box(b) for b in boxes_px] if boxes_px is not None else None,
        )


@dataclass(frozen=True)
class Score:
    """One expression scored: the matching boxes in pixels, the first box's IoU and the best box's."""

    boxes_px: list[Box]
    iou: float
    correct: bool
    any_box_iou: float
    any_box_correct: bool
    phrase_mismatch: bool
    """The answer had boxes, but none under a phrase equal to the expression."""

    @property
    def no_box(self) -> bool:
        return not self.boxes_px

    @property
    def no_object(self) -> bool:
        """The answer had no box at all (the other kind of "no box" is a phrase mismatch)."""
        return self.no_box and not self.phrase_mismatch


@dataclass(frozen=True)
class Tally:
    """Counts over a set of scored expressions."""

    n: int = 0
    correct: int = 0
    any_box_correct: int = 0
    no_box: int = 0
    phrase_mismatch: int = 0
    no_object: int = 0

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def any_box_accuracy(self) -> float:
        return self.any_box_correct / self.n if self.n else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "accuracy": self.accuracy,
            "accuracy_ci95": list(wilson_interval(self.correct, self.n)),
            "any_box_accuracy": self.any_box_accuracy,
            "any_box_accuracy_ci95": list(wilson_interval(self.any_box_correct, self.n)),
            "n": self.n,
            "correct": self.correct,
            "any_box_correct": self.any_box_correct,
            "no_box": self.no_box,
            "phrase_mismatch": self.phrase_mismatch,
            "no_object": self.no_object,
        }


def wilson_interval(successes: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion (95% by default): what a run of ``n`` expressions can tell apart.

    A run of 100 expressions at 52% is compatible with anything from 42% to 62%; 10,000 narrow it to two points.

    >>> [round(v, 4) for v in wilson_interval(52, 100)]
    [0.4232, 0.6154]
    >>> [round(v, 4) for v in wilson_interval(5232, 10000)]
    [0.5134, 0.533]
    >>> wilson_interval(0, 0)
    (0.0, 1.0)
    """
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


def _box(values: Sequence[float]) -> Box:
    x1, y1, x2, y2 = (float(v) for v in values)
    return (x1, y1, x2, y2)


def xywh_to_xyxy(box: Sequence[float]) -> Box:
    """COCO ``[x, y, w, h]`` to ``(x1, y1, x2, y2)``, as the official script converts the ground truth.

    >>> xywh_to_xyxy([10, 20, 30, 40])
    (10.0, 20.0, 40.0, 60.0)
    """
    x, y, w, h = (float(v) for v in box)
    return (x, y, x + w, y + h)


def iou(a: Box, b: Box) -> float:
    """Intersection over union of two ``(x1, y1, x2, y2)`` boxes, continuous coordinates, in float32.

    >>> iou((0, 0, 10, 10), (0, 0, 10, 10))
    1.0
    >>> iou((0, 0, 10, 10), (5, 0, 15, 10))  # 50 / 150
    0.3333333432674408
    >>> iou((0, 0, 10, 10), (2, 2, 7, 7))  # contained: 25 / 100
    0.25
    >>> iou((0, 0, 10, 10), (10, 0, 20, 10))  # touching edges share no area (no +1 pixel)
    0.0
    >>> iou(NO_BOX, (0, 0, 10, 10))
    0.0
    >>> iou((8, 8, 2, 2), (0, 0, 10, 10))  # an inverted box covers nothing
    0.0
    """
    p = np.asarray(a, dtype=np.float64).astype(np.float32)
    g = np.asarray(b, dtype=np.float64).astype(np.float32)
    area_p = (p[2] - p[0]) * (p[3] - p[1])
    area_g = (g[2] - g[0]) * (g[3] - g[1])
    wh = np.maximum(np.minimum(p[2:], g[2:]) - np.maximum(p[:2], g[:2]), np.float32(0))
    inter = wh[0] * wh[1]
    if inter <= 0:
        return 0.0
    return float(inter / (area_p + area_g - inter))


def matching_boxes(expression: str, entities: Iterable[PredictedEntity]) -> list[Box]:
    """Normalized boxes of the entities whose phrase equals the expression (both stripped), in order.

    >>> matching_boxes(" the dog", [PredictedEntity("The dog", [(0, 0, 1, 1)]),
    ...                             PredictedEntity("the dog", [(0, 0, .5, .5), (.5, .5, 1, 1)])])
    [(0, 0, 0.5, 0.5), (0.5, 0.5, 1, 1)]
    """
    wanted = expression.strip()
    return [box for entity in entities if entity.phrase.strip() == wanted for box in entity.boxes]


def score(expression: str, gt_box: Box, entities: Sequence[PredictedEntity], width: float, height: float) -> Score:
    """Score one answer against the ground-truth box (pixels, xyxy) of an image ``width`` x ``height``."""
    boxes_px = [to_pixels(box, width, height) for box in matching_boxes(expression, entities)]
    ious = [iou(box, gt_box) for box in boxes_px] or [iou(NO_BOX, gt_box)]
    best = max(ious)
    return Score(
        boxes_px=boxes_px,
        iou=ious[0],
        correct=ious[0] >= IOU_THRESHOLD,
        any_box_iou=best,
        any_box_correct=best >= IOU_THRESHOLD,
        phrase_mismatch=not boxes_px and any(entity.boxes for entity in entities),
    )


def tally(scores: Iterable[Score]) -> Tally:
    """Counts over scored expressions.

    >>> t = tally([score("a", (0, 0, 10, 10), [PredictedEntity("a", [(0, 0, 1, 1)])], 10, 10),
    ...            score("a", (0, 0, 10, 10), [PredictedEntity("b", [(0, 0, 1, 1)])], 10, 10)])
    >>> t.accuracy, t.no_box, t.phrase_mismatch, t.no_object
    (0.5, 1, 1, 0)
    """
    n = correct = any_box = no_box = mismatch = no_object = 0
    for s in scores:
        n += 1
        correct += s.correct
        any_box += s.any_box_correct
        no_box += s.no_box
        mismatch += s.phrase_mismatch
        no_object += s.no_object
    return Tally(n, correct, any_box, no_box, mismatch, no_object)

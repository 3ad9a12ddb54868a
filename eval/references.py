"""Geometric reference predictors: what the 32x32 location grid allows, and a floor. No model runs.

- :class:`RoundTripPredictor` (``--predictor roundtrip``): the ground-truth box encoded as Kosmos-2 encodes a
  box (its corners' cells) and decoded again. This is the model copying the truth through the grid, not the best
  the grid can do: decoding to cell centres shrinks a box by half a cell on each side.
- :class:`CeilingPredictor` (``--predictor ceiling``): for each box the pair of patch-index tokens whose decoded
  box has the highest IoU with it (:func:`best_patch_pair`): the protocol's true ceiling. On
  ``python -m eval synth --n 300`` the round trip scores 95.33% and the ceiling 99.00%.
- :class:`WholeImagePredictor` (``--predictor whole-image``): the whole image as the box, a floor.

Each answers under the expression as its phrase, so only the box is tested.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from eval.datasets import RefExample
from eval.predictors import Prediction, Predictor
from eval.refexp import PredictedEntity
from serve.kosmos2.grounding import GRID, Box, box_to_patch_indices, extract_entities, patch_token


class ReferencePredictor(Predictor):
    """A predictor computed from the ground truth alone, many examples per call."""

    batch_size = 256

    async def predict(self, batch: Sequence[RefExample]) -> list[Prediction]:
        return [self.one(example) for example in batch]

    def one(self, example: RefExample) -> Prediction:
        raise NotImplementedError


class RoundTripPredictor(ReferencePredictor):
    """The ground-truth box quantized to the 32x32 grid and decoded again, under the expression's phrase."""

    name = "roundtrip"

    def one(self, example: RefExample) -> Prediction:
        normalized = _normalized(example)
        clipped = (max(normalized[0], 0.0), max(normalized[1], 0.0), min(normalized[2], 1.0), min(normalized[3], 1.0))
        try:
            upper_left, lower_right = box_to_patch_indices(clipped)
        except ValueError:  # an empty ground-truth box has no encoding: no answer could name it
            return Prediction("(the ground-truth box is empty inside the image)")
        return _answer(example, upper_left, lower_right)


class CeilingPredictor(ReferencePredictor):
    """The best pair of patch-index tokens for the ground-truth box, under the expression's phrase."""

    name = "ceiling"

    def one(self, example: RefExample) -> Prediction:
        x1, y1, x2, y2 = _normalized(example)
        if not (x1 < x2 and y1 < y2):
            return Prediction("(the ground-truth box is empty)")
        return _answer(example, *best_patch_pair((x1, y1, x2, y2)))


class WholeImagePredictor(ReferencePredictor):
    """The whole image as the box of the expression."""

    name = "whole-image"

    def one(self, example: RefExample) -> Prediction:
        phrase = example.expression.strip()
        return Prediction(phrase, [PredictedEntity(phrase, [(0.0, 0.0, 1.0, 1.0)], (0, len(phrase)))])


@functools.lru_cache(maxsize=65536)
def best_patch_pair(box: Box, grid: int = GRID) -> tuple[int, int]:
    """The (upper-left, lower-right) patch indices whose decoded box has the highest IoU with a normalized box.

    Kosmos-2 decodes two cells to their centres, or to their outer edges when they share a row or a column
    (``serve.kosmos2.grounding.patch_indices_to_box``), so the decodable boxes are: centre intervals on both
    axes, or edge intervals on both axes with one of them a single cell. Every such box is scored at once.

    >>> best_patch_pair((0.0, 0.0, 1.0, 1.0))  # the whole image: centres of the corner cells lose half a cell
    (0, 1023)
    >>> best_patch_pair((0.5, 0.5, 0.53125, 0.53125))  # exactly one cell
    (528, 528)
    >>> best_patch_pair((0.0, 0.0, 1.0, 0.03125))  # a strip one cell high: edges of a row
    (0, 31)
    """
    centre_lo, centre_hi, edge_lo, edge_hi = _intervals(grid)
    single = edge_lo == edge_hi
    centres = [_axis(centre_lo, centre_hi, box[k], box[k + 2], grid, centred=True) for k in (0, 1)]
    edges = [_axis(edge_lo, edge_hi, box[k], box[k + 2], grid, centred=False) for k in (0, 1)]
    cells = [_select(edge, single) for edge in edges]
    families = (  # (x overlap, x length, x cells), (y ...): every decodable box is in one of them
        ((*centres[0], centre_lo, centre_hi), (*centres[1], centre_lo, centre_hi)),
        ((*edges[0], edge_lo, edge_hi), (*cells[1], edge_lo[single], edge_hi[single])),
        ((*cells[0], edge_lo[single], edge_hi[single]), (*edges[1], edge_lo, edge_hi)),
    )
    area = (box[2] - box[0]) * (box[3] - box[1])
    best = (-1.0, 0, 0)
    for (inter_x, len_x, x_lo, x_hi), (inter_y, len_y, y_lo, y_hi) in families:
        inter = np.outer(inter_x, inter_y)
        iou = inter / (np.outer(len_x, len_y) + area - inter)
        i, j = np.unravel_index(int(np.argmax(iou)), iou.shape)
        if iou[i, j] > best[0]:
            best = (float(iou[i, j]), int(y_lo[j]) * grid + int(x_lo[i]), int(y_hi[j]) * grid + int(x_hi[i]))
    return best[1], best[2]


@functools.lru_cache(maxsize=4)
def _intervals(grid: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Cell pairs (first, last) on one axis: distinct cells (decoded to centres) and ordered cells (to edges)."""
    first, last = np.triu_indices(grid)
    distinct = first < last
    return first[distinct], last[distinct], first, last


def _axis(
    lo: np.ndarray, hi: np.ndarray, start: float, end: float, grid: int, centred: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Overlap with [start, end] and length of the decoded interval of each cell pair ``lo``..``hi`` on one axis."""
    left, right = ((lo + 0.5) / grid, (hi + 0.5) / grid) if centred else (lo / grid, (hi + 1) / grid)
    return np.clip(np.minimum(right, end) - np.maximum(left, start), 0, None), right - left


def _select(pair: tuple[np.ndarray, np.ndarray], keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return pair[0][keep], pair[1][keep]


def _normalized(example: RefExample) -> Box:
    x1, y1, x2, y2 = example.box
    w, h = example.width, example.height
    return (x1 / w, y1 / h, x2 / w, y2 / h)


def _answer(example: RefExample, upper_left: int, lower_right: int) -> Prediction:
    phrase = example.expression.strip()
    markup = f"<phrase> {phrase}</phrase><object>{patch_token(upper_left)}{patch_token(lower_right)}</object>"
    content, entities = extract_entities(markup)
    return Prediction(content, [PredictedEntity(e.phrase, e.boxes, e.span) for e in entities])

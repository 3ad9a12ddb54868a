"""The reference predictors' geometry: the best token pair is the best of all 1024 x 1024 pairs."""

from __future__ import annotations

import numpy as np
import pytest

from eval.datasets import RefExample
from eval.references import CeilingPredictor, RoundTripPredictor, best_patch_pair
from eval.refexp import iou, score
from serve.kosmos2.grounding import patch_indices_to_box

CELLS = np.arange(1024)
UL_X, UL_Y, LR_X, LR_Y = CELLS[:, None] % 32, CELLS[:, None] // 32, CELLS[None, :] % 32, CELLS[None, :] // 32
EDGES = (UL_X == LR_X) | (UL_Y == LR_Y)
DECODED = [  # every pair's box, as patch_indices_to_box decodes it, on a 1024 x 1024 grid of pairs
    np.where(EDGES, UL_X / 32, (UL_X + 0.5) / 32),
    np.where(EDGES, UL_Y / 32, (UL_Y + 0.5) / 32),
    np.where(EDGES, (LR_X + 1) / 32, (LR_X + 0.5) / 32),
    np.where(EDGES, (LR_Y + 1) / 32, (LR_Y + 0.5) / 32),
]


def exhaustive_best(box: tuple[float, float, float, float]) -> float:
    x1, y1, x2, y2 = DECODED
    inter = np.clip(np.minimum(x2, box[2]) - np.maximum(x1, box[0]), 0, None)
    inter = inter * np.clip(np.minimum(y2, box[3]) - np.maximum(y1, box[1]), 0, None)
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    return float(np.max(inter / (area + (box[2] - box[0]) * (box[3] - box[1]) - inter)))


def test_the_decoded_grid_is_the_models():
    for first, second in [(0, 1023), (33, 33), (32, 40), (40, 32), (5, 911), (44, 863)]:
        assert tuple(d[first, second] for d in DECODED) == patch_indices_to_box(first, second)


@pytest.mark.parametrize("seed", range(12))
def test_best_patch_pair_is_the_best_of_every_pair(seed):
    rng = np.random.default_rng(seed)
    for _ in range(3):
        x1, x2 = sorted(rng.uniform(-0.02, 1.02, 2))
        y1, y2 = sorted(rng.uniform(0, 1, 2) * rng.choice([1.0, 0.1]))
        box = (float(x1), float(y1), float(x2), float(max(y2, y1 + 1e-3)))
        first, second = best_patch_pair(box)
        assert iou(patch_indices_to_box(first, second), box) == pytest.approx(exhaustive_best(box), rel=1e-5)


def test_the_ceiling_beats_the_round_trip_where_the_grid_shrinks_a_box():
    # 3 x 3 cells of 7 pixels: the round trip decodes to the corner cells' centres, 2 x 2 cells (IoU 4/9); the
    # centres of the cells around them cover 4 x 4 cells (IoU 9/16)
    example = RefExample("x", "synth", "val", "a dot", (7.0, 7.0, 28.0, 28.0), 224, 224, "", "0")
    roundtrip = RoundTripPredictor().one(example)
    ceiling = CeilingPredictor().one(example)
    assert not score("a dot", example.box, roundtrip.entities, 224, 224).correct
    assert score("a dot", example.box, ceiling.entities, 224, 224).correct
    assert ceiling.text == "a dot" and ceiling.entities[0].phrase == "a dot"

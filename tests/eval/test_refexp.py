"""The RefCOCO protocol: golden IoU and parsing cases, and agreement with the official script's algorithm."""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eval.refexp import NO_BOX, Z_95, PredictedEntity, iou, matching_boxes, score, tally, wilson_interval, xywh_to_xyxy
from serve.kosmos2.grounding import extract_entities


def entities_of(text: str) -> list[PredictedEntity]:
    """What the service returns for an answer: the entities ``serve.kosmos2.grounding`` extracts."""
    return [PredictedEntity(e.phrase, e.boxes) for e in extract_entities(text)[1]]


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((0, 0, 10, 10), (0, 0, 10, 10), 1.0),
        ((0, 0, 10, 10), (5, 0, 15, 10), 50 / 150),
        ((0, 0, 10, 10), (5, 5, 15, 15), 25 / 175),
        ((0, 0, 10, 10), (2, 2, 7, 7), 0.25),
        ((0, 0, 10, 10), (20, 20, 30, 30), 0.0),
        ((0, 0, 10, 10), (10, 10, 20, 20), 0.0),  # corners touch: no +1 pixel, so no overlap
        ((0.5, 0.5, 2.5, 1.5), (1.0, 0.0, 3.0, 1.0), 0.75 / 3.25),  # sub-pixel coordinates count
        (NO_BOX, (0, 0, 10, 10), 0.0),
        ((9, 1, 1, 9), (0, 0, 10, 10), 0.0),  # inverted in x
        ((0, 0, 0, 0), (0, 0, 0, 0), 0.0),  # 0/0 in the official script (NaN): wrong either way
    ],
)
def test_iou_golden(a, b, expected):
    assert iou(a, b) == pytest.approx(expected, rel=1e-6)
    assert iou(b, a) == pytest.approx(expected, rel=1e-6)


def test_iou_threshold_is_inclusive():
    gt = (0.0, 0.0, 10.0, 10.0)
    assert iou((0.0, 0.0, 10.0, 5.0), gt) == 0.5
    assert score("x", gt, [PredictedEntity("x", [(0.0, 0.0, 1.0, 0.5)])], 10, 10).correct


def test_iou_is_float32_like_the_official_script():
    # 1/3 in float32 is 0.3333333432674408, not float64's 0.3333333333333333
    assert iou((0, 0, 10, 10), (5, 0, 15, 10)) == 0.3333333432674408


def test_ground_truth_is_coco_xywh():
    assert xywh_to_xyxy([12.5, 3, 10, 20.25]) == (12.5, 3.0, 22.5, 23.25)


def test_snowman_answer_is_parsed_and_scaled_by_the_annotation_size():
    text = "<grounding><phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>"
    s = score("a snowman", (250.0, 22.5, 630.0, 397.5), entities_of(text), width=640, height=480)
    assert s.boxes_px == [(250.0, 22.5, 630.0, 397.5)]
    assert s.iou == 1.0 and s.correct and not s.no_box


def test_phrase_must_equal_the_expression_after_stripping():
    boxes = [(0.0, 0.0, 0.5, 0.5)]
    assert matching_boxes("  the dog ", [PredictedEntity("the dog", boxes)]) == boxes
    for other in ("The dog", "the  dog", "dog", "the dog."):
        assert matching_boxes("the dog", [PredictedEntity(other, boxes)]) == []


def test_first_box_of_the_first_matching_entity_is_scored_and_any_box_is_the_bound():
    text = (
        "<grounding><phrase> the cat</phrase><object><patch_index_0000><patch_index_0001></object> and"
        "<phrase> a dog</phrase><object><patch_index_0000><patch_index_1023></object> with"
        "<phrase> the cat</phrase><object><patch_index_0528><patch_index_0528></delimiter_of_multi_objects/>"
        "<patch_index_0000><patch_index_1023></object>"
    )
    whole = (0.0, 0.0, 100.0, 100.0)
    s = score("the cat", whole, entities_of(text), 100, 100)
    assert len(s.boxes_px) == 3  # "a dog" is not the expression
    assert s.boxes_px[0] == (0.0, 0.0, 6.25, 3.125)  # same row: whole cells
    assert not s.correct
    assert s.any_box_correct  # the third box, cell centres 1.5625 .. 98.4375
    assert s.any_box_iou == pytest.approx((96.875**2) / 100**2, rel=1e-6)


def test_no_box_is_wrong_and_a_box_under_another_phrase_is_a_mismatch():
    gt = (0.0, 0.0, 10.0, 10.0)
    silent = score("a dog", gt, entities_of("<grounding><phrase> a dog</phrase> runs"), 10, 10)
    assert silent.no_box and not silent.correct and silent.iou == 0.0 and not silent.phrase_mismatch
    assert silent.no_object
    elsewhere = score(
        "a dog", gt, entities_of("<phrase> A dog</phrase><object><patch_index_0000><patch_index_1023></object>"), 10, 10
    )
    assert elsewhere.no_box and elsewhere.phrase_mismatch and not elsewhere.no_object
    unnamed = score("a dog", gt, entities_of("<object><patch_index_0000><patch_index_1023></object>"), 10, 10)
    assert unnamed.no_box and unnamed.phrase_mismatch and not unnamed.no_object
    found = score(
        "a dog", gt, entities_of("<phrase> a dog</phrase><object><patch_index_0000><patch_index_1023></object>"), 10, 10
    )
    assert not (found.no_box or found.phrase_mismatch or found.no_object)


def test_tally_counts():
    gt = (0.0, 0.0, 10.0, 10.0)
    hit = PredictedEntity("x", [(0.0, 0.0, 1.0, 1.0)])
    miss_then_hit = PredictedEntity("x", [(0.9, 0.9, 1.0, 1.0), (0.0, 0.0, 1.0, 1.0)])
    t = tally([score("x", gt, e, 10, 10) for e in ([hit], [miss_then_hit], [], [PredictedEntity("y", hit.boxes)])])
    assert (t.n, t.correct, t.any_box_correct, t.no_box, t.phrase_mismatch, t.no_object) == (4, 1, 2, 2, 1, 1)
    assert t.accuracy == 0.25 and t.any_box_accuracy == 0.5


def test_wilson_interval_is_exact_at_the_ends_and_narrows_with_n():
    # at 0 or n successes Wilson's bounds are z^2 / (n + z^2) and n / (n + z^2)
    assert wilson_interval(0, 10) == (0.0, pytest.approx(Z_95**2 / (10 + Z_95**2)))
    assert wilson_interval(10, 10) == pytest.approx((10 / (10 + Z_95**2), 1.0))
    assert pytest.approx(1.959964, abs=1e-6) == Z_95
    widths = [high - low for low, high in (wilson_interval(n // 2, n) for n in (10, 100, 1000, 10000))]
    assert widths == sorted(widths, reverse=True) and widths[-1] < 0.02
    low, high = wilson_interval(30, 100)
    assert low < 0.3 < high and high - 0.3 > 0.3 - low  # pulled toward one half, unlike Wald's
    t = tally([score("x", (0, 0, 10, 10), [PredictedEntity("x", [(0, 0, 1, 1)])], 10, 10)] * 3)
    assert t.as_dict()["accuracy_ci95"] == list(wilson_interval(3, 3))


# The official algorithm, restated from unilm's kosmos-2/evaluation (decode_string.py, refexp_evaluate.py,
# box_ops.py) for this comparison: parse the answer, keep the boxes whose phrase matches, score in torch.
OFFICIAL_PATTERN = re.compile(
    r"(?:(<phrase>([^<]+)</phrase>))?<object>((?:<patch_index_\d+><patch_index_\d+></delimiter_of_multi_objects/>)*"
    r"<patch_index_\d+><patch_index_\d+>)</object>"
)


def official_decode(ul: int, lr: int, p: int = 32) -> list[float]:
    cell = 1.0 / p
    ux, uy, lx, ly = ul % p, ul // p, lr % p, lr // p
    if ul == lr or ux == lx or uy == ly:
        return [ux * cell, uy * cell, lx * cell + cell, ly * cell + cell]
    return [ux * cell + cell / 2, uy * cell + cell / 2, lx * cell + cell / 2, ly * cell + cell / 2]


def official_score(caption: str, answer: str, width: int, height: int, gt_xywh: list[float]) -> tuple[bool, bool]:
    boxes = []
    for tag, phrase, content in OFFICIAL_PATTERN.findall(answer):
        name = phrase if tag else None
        for pair in content.split("</delimiter_of_multi_objects/>"):
            first, second = (int(v) for v in re.findall(r"<patch_index_(\d+)>", pair))
            if (name or f"<{first}><{second}>").strip() == caption.strip():
                x1, y1, x2, y2 = official_decode(first, second)
                boxes.append([x1 * width, y1 * height, x2 * width, y2 * height])
    predicted = torch.as_tensor(boxes or [[0.0, 0.0, 0.0, 0.0]]).view(-1, 4)
    x, y, w, h = gt_xywh
    target = torch.as_tensor([x, y, w + x, h + y]).view(-1, 4)
    area_p = (predicted[:, 2] - predicted[:, 0]) * (predicted[:, 3] - predicted[:, 1])
    area_t = (target[:, 2] - target[:, 0]) * (target[:, 3] - target[:, 1])
    lt = torch.max(predicted[:, None, :2], target[:, :2])
    rb = torch.min(predicted[:, None, 2:], target[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, :, 0] * wh[:, :, 1]
    ious = inter / (area_p[:, None] + area_t - inter)
    return bool(ious[0, 0] >= 0.5), bool(max(ious) >= 0.5)


PHRASES = st.sampled_from(
    ["the red car", "the red car", "the red car", " the red car", "the red car ", "The red car", "the  red car", "car"]
)
ORDERED = st.tuples(st.integers(0, 31), st.integers(0, 31), st.integers(0, 31), st.integers(0, 31)).map(
    lambda v: (min(v[1], v[3]) * 32 + min(v[0], v[2]), max(v[1], v[3]) * 32 + max(v[0], v[2]))
)
CELLS = st.one_of(ORDERED, ORDERED, ORDERED, st.tuples(st.integers(0, 1023), st.integers(0, 1023)))
"""Corner cells, mostly in order, sometimes any two (a model can write them inverted)."""


@st.composite
def cases(draw) -> tuple[str, int, int, tuple[float, float, float, float]]:
    """An answer drawing its boxes from a small pool, and a ground truth near the pool's first box."""
    pool = draw(st.lists(CELLS, min_size=1, max_size=3))
    parts = []
    for _ in range(draw(st.integers(1, 4))):
        pairs = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3))
        content = "</delimiter_of_multi_objects/>".join(f"<patch_index_{a:04d}><patch_index_{b:04d}>" for a, b in pairs)
        kind = draw(st.sampled_from(["phrase", "phrase", "object", "words"]))
        if kind == "phrase":
            parts.append(f"<phrase>{draw(PHRASES)}</phrase><object>{content}</object>")
        elif kind == "object":
            parts.append(f"<object>{content}</object>")
        else:
            parts.append(" on the left of")
    width, height = draw(st.integers(1, 1000)), draw(st.integers(1, 1000))
    x1, y1, x2, y2 = official_decode(*pool[0])
    box_w, box_h = round((x2 - x1) * width), round((y2 - y1) * height)
    dx, dy = (st.integers(-(abs(n) // 4) - 1, abs(n) // 4 + 1) for n in (box_w, box_h))
    gt_x, gt_y = round(x1 * width) + draw(dx), round(y1 * height) + draw(dy)
    gt_w, gt_h = max(0, box_w + draw(dx)), max(0, box_h + draw(dy))
    return "<grounding>" + "".join(parts), width, height, (gt_x, gt_y, gt_w, gt_h)


@settings(max_examples=400, deadline=None)
@given(case=cases())
def test_scores_agree_with_the_official_algorithm(case):
    answer, width, height, gt = case
    expected = official_score("the red car", answer, width, height, [float(v) for v in gt])
    s = score("the red car", xywh_to_xyxy(gt), entities_of(answer), width, height)
    assert (s.correct, s.any_box_correct) == expected

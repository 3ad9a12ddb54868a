"""Box <-> patch-index geometry and entity extraction, against hand-computed values and transformers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.kosmos2.processing_kosmos2 import (
    clean_text_and_extract_entities_with_bboxes,
    coordinate_to_patch_index,
)

from serve.kosmos2.grounding import (
    Entity,
    box_to_patch_indices,
    drop_prefix,
    extract_entities,
    object_tokens,
    patch_indices_to_box,
    to_pixels,
)

SNOWMAN = (
    "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> "
    "warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>."
)


def test_snowman_golden():
    clean, entities = extract_entities(SNOWMAN)
    assert clean == "An image of a snowman warming himself by a fire."
    assert entities == [
        Entity("a snowman", (12, 21), [(0.390625, 0.046875, 0.984375, 0.828125)]),
        Entity("a fire", (41, 47), [(0.171875, 0.015625, 0.484375, 0.890625)]),
    ]
    assert [clean[slice(*e.span)] for e in entities] == ["a snowman", "a fire"]


def test_box_encoding_golden():
    # ul = floor(0.05*32)*32 + floor(0.39*32) = 1*32 + 12 = 44; lr = ceil(0.83*32-1)*32 + ceil(0.99*32-1) = 26*32+31
    assert box_to_patch_indices((0.39, 0.05, 0.99, 0.83)) == (44, 863)
    assert box_to_patch_indices((0.0, 0.0, 1.0, 1.0)) == (0, 1023)
    assert box_to_patch_indices((0.5, 0.25, 0.75, 0.5)) == (8 * 32 + 16, 15 * 32 + 23)
    assert object_tokens((0.39, 0.05, 0.99, 0.83)) == "<object><patch_index_0044><patch_index_0863></object>"


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        # a 2x2-cell box: edges at the cell centres (1/64 inside the outer edges)
        ((0.0, 0.0, 0.0625, 0.0625), (0.015625, 0.015625, 0.046875, 0.046875)),
        # cells in the same row: whole cells, so the box keeps its height
        ((0.25, 0.5, 0.5, 0.53125), (0.25, 0.5, 0.5, 0.53125)),
        # cells in the same column
        ((0.75, 0.0, 0.78125, 1.0), (0.75, 0.0, 0.78125, 1.0)),
        # one cell
        ((0.5, 0.5, 0.53125, 0.53125), (0.5, 0.5, 0.53125, 0.53125)),
    ],
)
def test_degenerate_and_cell_boxes(box, expected):
    assert patch_indices_to_box(*box_to_patch_indices(box)) == expected


def test_multi_box_object():
    text = (
        "<grounding> An image of<phrase> two dogs</phrase><object><patch_index_0000><patch_index_0033>"
        "</delimiter_of_multi_objects/><patch_index_0990><patch_index_1023></object> playing."
    )
    clean, entities = extract_entities(text)
    assert clean == "An image of two dogs playing."
    assert entities == [
        Entity(
            "two dogs",
            (12, 20),
            [(0.015625, 0.015625, 0.046875, 0.046875), (0.953125, 0.953125, 0.984375, 0.984375)],
        )
    ]


def test_object_without_phrase():
    text = "<grounding> It is<object><patch_index_0033><patch_index_0066></object> here"
    clean, entities = extract_entities(text)
    assert clean == "It is here"
    # cells 33=(1,1) and 66=(2,2): centres at 1.5/32 and 2.5/32
    assert entities == [Entity("", (5, 5), [(0.046875, 0.046875, 0.078125, 0.078125)])]


def test_phrase_without_object_is_not_an_entity():
    clean, entities = extract_entities("<grounding><phrase> a cat</phrase> sleeps")
    assert (clean, entities) == ("a cat sleeps", [])


def test_pixels_and_prefix():
    assert to_pixels((0.390625, 0.046875, 0.984375, 0.828125), 640, 480) == (250.0, 22.5, 630.0, 397.5)
    clean, entities = extract_entities(
        "<grounding> Question: what is it? Answer:<phrase> a dog</phrase><object><patch_index_0000>"
        "<patch_index_1023></object>."
    )
    assert drop_prefix(clean, entities, len("Question: what is it? Answer:")) == (
        "a dog.",
        [Entity("a dog", (0, 5), [(0.015625, 0.015625, 0.984375, 0.984375)])],
    )


def test_invalid_boxes_are_refused():
    for box in [(0.5, 0.5, 0.5, 0.6), (0.1, 0.2, 1.2, 0.9), (-0.1, 0, 0.5, 0.5), (0, 0, 1)]:
        with pytest.raises(ValueError):
            box_to_patch_indices(box)


coordinates = st.floats(0, 1, allow_nan=False)


@given(coordinates, coordinates, coordinates, coordinates)
def test_encoding_matches_transformers(a, b, c, d):
    x1, x2, y1, y2 = min(a, b), max(a, b), min(c, d), max(c, d)
    if x1 == x2 or y1 == y2:
        return
    assert box_to_patch_indices((x1, y1, x2, y2)) == coordinate_to_patch_index((x1, y1, x2, y2), 32)


PIECES = [
    " a",
    " dog",
    " the",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "<patch_index_0044>",
    "<patch_index_0863>",
    "<patch_index_0005>",
    "</delimiter_of_multi_objects/>",
    " ",
    ".",
    "<grounding>",
]


@settings(max_examples=300)
@given(st.lists(st.sampled_from(PIECES), max_size=30))
def test_extraction_matches_transformers(pieces):
    """Arbitrary mixes of tags give transformers' clean text and entities (no-phrase objects aside: it names
    them after their patch tokens, we leave the phrase empty)."""
    text = "".join(pieces)
    clean, entities = extract_entities(text)
    expected_clean, expected = clean_text_and_extract_entities_with_bboxes(text)
    assert clean == expected_clean
    assert len(entities) == len(expected)
    for ours, (name, span, boxes) in zip(entities, expected):
        assert ours.span == span
        assert ours.boxes == boxes
        assert ours.phrase == ("" if name.startswith("<patch_index_") else name)

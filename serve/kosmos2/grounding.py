"""Kosmos-2 grounding geometry and entity extraction (pure functions, no torch).

Kosmos-2 writes a box as two tokens on a 32x32 grid of the 224x224 model input: the cell of the upper-left
corner and the cell of the lower-right corner. Generated text interleaves phrases and boxes:

    <phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object>

This module converts boxes to and from those tokens exactly as the official Kosmos-2 code does (unilm
``decode_string.py``, transformers' ``processing_kosmos2``) and turns generated text into clean text plus
entities whose spans index the clean text.

    >>> box_to_patch_indices((0.390625, 0.046875, 0.984375, 0.828125))
    (44, 863)
    >>> patch_indices_to_box(44, 863)
    (0.390625, 0.046875, 0.984375, 0.828125)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

GRID = 32
"""Cells per side of the patch-index grid (1,024 patch-index tokens)."""

Box = tuple[float, float, float, float]
"""A box (x1, y1, x2, y2), normalized to [0, 1] in the original image (the model squashes every image)."""

TAG_PATTERN = re.compile(r"<.*?>")
"""What Kosmos-2's post-processing removes from text: anything between angle brackets."""

_ENTITY_PATTERN = re.compile(
    r"(?:(<phrase>([^<]+)</phrase>))?<object>((?:<patch_index_\d+><patch_index_\d+></delimiter_of_multi_objects/>)*"
    r"<patch_index_\d+><patch_index_\d+>)</object>"
)
_PATCH_PATTERN = re.compile(r"<patch_index_(\d+)>")


@dataclass(frozen=True)
class Entity:
    """A grounded phrase: its text, its [start, end) span in the clean text, and its normalized boxes.

    ``phrase`` is empty for an ``<object>`` the model wrote without a phrase (transformers names those after
    their patch tokens instead); its span is then empty, at the place the object was written.
    """

    phrase: str
    span: tuple[int, int]
    boxes: list[Box] = field(default_factory=list)


def check_box(box: Box) -> Box:
    """Return ``box`` as floats if it is a valid normalized box, else raise ``ValueError``.

    >>> check_box((0, 0, 1, 1))
    (0.0, 0.0, 1.0, 1.0)
    >>> check_box((0.5, 0.2, 0.4, 0.9))
    Traceback (most recent call last):
    ...
    ValueError: a box is [x1, y1, x2, y2] with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1, got [0.5, 0.2, 0.4, 0.9]
    """
    if len(box) != 4:
        raise ValueError(f"a box has 4 numbers [x1, y1, x2, y2], got {len(box)}")
    x1, y1, x2, y2 = (float(v) for v in box)
    if not (0.0 <= x1 < x2 <= 1.0 and 0.0 <= y1 < y2 <= 1.0):
        raise ValueError(
            "a box is [x1, y1, x2, y2] with 0 <= x1 < x2 <= 1 and 0 <= y1 < y2 <= 1, "
            f"got [{', '.join(f'{v:g}' for v in box)}]"
        )
    return (x1, y1, x2, y2)


def box_to_patch_indices(box: Box, grid: int = GRID) -> tuple[int, int]:
    """Upper-left and lower-right cell indices of a normalized box, as Kosmos-2 encodes them.

    >>> box_to_patch_indices((0.0, 0.0, 1.0, 1.0))
    (0, 1023)
    >>> box_to_patch_indices((0.5, 0.5, 0.53125, 0.53125))  # exactly one cell
    (528, 528)
    """
    x1, y1, x2, y2 = check_box(box)
    upper_left = math.floor(y1 * grid) * grid + math.floor(x1 * grid)
    lower_right = math.ceil(y2 * grid - 1) * grid + math.ceil(x2 * grid - 1)
    return upper_left, lower_right


def patch_indices_to_box(upper_left: int, lower_right: int, grid: int = GRID) -> Box:
    """Normalized box of two cell indices: cell centres, or whole cells when they share a row or column.

    >>> patch_indices_to_box(0, 1023)
    (0.015625, 0.015625, 0.984375, 0.984375)
    >>> patch_indices_to_box(33, 33)
    (0.03125, 0.03125, 0.0625, 0.0625)
    >>> patch_indices_to_box(32, 40)  # same row: the cells' outer edges
    (0.0, 0.03125, 0.28125, 0.0625)
    """
    cell = 1.0 / grid
    ul_x, ul_y = upper_left % grid, upper_left // grid
    lr_x, lr_y = lower_right % grid, lower_right // grid
    if ul_x == lr_x or ul_y == lr_y:  # includes upper_left == lower_right
        return (ul_x * cell, ul_y * cell, lr_x * cell + cell, lr_y * cell + cell)
    half = cell / 2
    return (ul_x * cell + half, ul_y * cell + half, lr_x * cell + half, lr_y * cell + half)


def patch_token(index: int) -> str:
    """The token of one grid cell.

    >>> patch_token(44)
    '<patch_index_0044>'
    """
    return f"<patch_index_{index:04d}>"


def object_tokens(box: Box, grid: int = GRID) -> str:
    """The ``<object>`` markup that Kosmos-2 uses for a box.

    >>> object_tokens((0.390625, 0.046875, 0.984375, 0.828125))
    '<object><patch_index_0044><patch_index_0863></object>'
    """
    upper_left, lower_right = box_to_patch_indices(box, grid)
    return f"<object>{patch_token(upper_left)}{patch_token(lower_right)}</object>"


def to_pixels(box: Box, width: int, height: int) -> Box:
    """Scale a normalized box to the original image (valid because the model squashes, not crops).

    >>> to_pixels((0.5, 0.25, 1.0, 0.75), 640, 480)
    (320.0, 120.0, 640.0, 360.0)
    """
    x1, y1, x2, y2 = box
    return (x1 * width, y1 * height, x2 * width, y2 * height)


def extract_entities(text: str, grid: int = GRID) -> tuple[str, list[Entity]]:
    """Clean text and grounded entities of Kosmos-2 output (the part after ``</image>``).

    Follows transformers' ``clean_text_and_extract_entities_with_bboxes``: tags are removed, the text is
    stripped, and each phrase's span is measured in the clean text without its surrounding spaces.

    >>> text = ("<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863>"
    ...         "</object> warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911>"
    ...         "</object>.")
    >>> clean, entities = extract_entities(text)
    >>> clean
    'An image of a snowman warming himself by a fire.'
    >>> entities[0]
    Entity(phrase='a snowman', span=(12, 21), boxes=[(0.390625, 0.046875, 0.984375, 0.828125)])
    >>> clean[12:21]
    'a snowman'
    """
    raw_clean = TAG_PATTERN.sub("", text)
    leading = len(raw_clean) - len(raw_clean.lstrip())
    entities = []
    for match in _ENTITY_PATTERN.finditer(text):
        phrase = match.group(2)
        boxes = [
            patch_indices_to_box(int(first), int(second), grid)
            for first, second in (
                _PATCH_PATTERN.findall(pair) for pair in match.group(3).split("</delimiter_of_multi_objects/>")
            )
        ]
        if phrase is None:
            at = _clean_length(text[: match.start()]) - leading
            entities.extend(Entity("", (at, at), [box]) for box in boxes)
            continue
        start = _clean_length(text[: match.start(2)]) - leading + (len(phrase) - len(phrase.lstrip()))
        end = _clean_length(text[: match.end(2)]) - leading - (len(phrase) - len(phrase.rstrip()))
        entities.append(Entity(phrase.strip(), (start, end), boxes))
    return raw_clean.strip(), entities


def _clean_length(text: str) -> int:
    return len(TAG_PATTERN.sub("", text))


def drop_prefix(clean: str, entities: list[Entity], prefix_chars: int) -> tuple[str, list[Entity]]:
    """Remove the first ``prefix_chars`` characters of clean text (and the spaces after them).

    Used to leave a prompt's own words (a question, an instruction) out of the answer. Entities that start
    inside the removed part are dropped; the others' spans are shifted.

    >>> drop_prefix("Question: what? Answer: a dog", [Entity("a dog", (24, 29))], 23)
    ('a dog', [Entity(phrase='a dog', span=(0, 5), boxes=[])])
    """
    rest = clean[prefix_chars:]
    shift = prefix_chars + len(rest) - len(rest.lstrip())
    kept = [Entity(e.phrase, (e.span[0] - shift, e.span[1] - shift), e.boxes) for e in entities if e.span[0] >= shift]
    return rest.lstrip(), kept

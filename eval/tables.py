"""Referring-expression tables (Parquet or JSONL), read in the layouts of their public exports.

:func:`load_table` recognises the layout from the columns (:data:`LAYOUTS`), and with it the box format:

- ``lmms-lab``: ``lmms-lab/RefCOCO``, ``RefCOCOplus``, ``RefCOCOg`` Parquet (``question_id``, ``image`` with
  inline bytes, ``answer`` holding the list of expressions, ``bbox`` as COCO ``xywh``, ``segmentation``,
  ``iscrowd``, ``file_name``); the split comes from the file name. Its RefCOCO ``val`` holds 8,811 rows and its
  RefCOCOg ``val`` 7,573, where the official val splits have 3,811 and 2,573 refs, and its RefCOCO ``test`` is no
  split of RefCOCO (unc): those examples carry a caveat, and the report does not set them beside the paper.
- ``jxu124``: ``jxu124/refcoco``, ``refcocoplus``, ``refcocog`` Parquet (the refer toolkit's fields: ``ref_id``,
  ``split``, ``sentences`` with their ``sent``, ``image_path`` such as ``coco/train2014/COCO_train2014_...jpg``,
  ``raw_image_info`` as JSON, ``captions``, and ``bbox`` as ``xyxy``).
- ``qwen-vl``: Qwen-VL's and InternVL's ``refcoco*_{split}.jsonl`` (``image``, ``sent``, ``bbox`` as ``xyxy``,
  ``width``, ``height``).
- ``table``: anything else with an expression column (:data:`EXPRESSION_COLUMNS`), an image column
  (:data:`IMAGE_COLUMNS`) and ``bbox``, read as ``xywh`` unless told otherwise.

``bbox_format="auto"`` takes the layout's format; ``xywh`` or ``xyxy`` overrides it. Either way every box is
checked against its image (``eval.datasets.read_box``).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from eval.datasets import (
    SPLITS,
    DatasetError,
    ImageResolver,
    RefExample,
    dataset_name,
    read_box,
    split_by_of,
)

EXPRESSION_COLUMNS = ("expression", "sent", "sentence", "caption", "referring_expression", "answer", "question")
"""Columns tried, in order, for the expression of a generic table row (a list in it means one row per expression)."""

IMAGE_COLUMNS = ("image", "image_path", "file_name", "img_path")
"""Columns tried, in order, for a table row's image: a path, bytes, or a ``{"bytes", "path"}`` struct."""


@dataclass(frozen=True)
class Layout:
    """A public table layout: the columns that identify it, where its expressions and image are, its box format."""

    name: str
    required: frozenset[str]
    any_of: frozenset[str]
    expression: str
    image: str
    bbox_format: str


LAYOUTS = (
    Layout(
        "jxu124",
        frozenset({"sentences", "image_path", "bbox", "ref_id"}),
        frozenset({"captions", "raw_anns", "raw_image_info"}),
        "sentences",
        "image_path",
        "xyxy",
    ),
    Layout(
        "lmms-lab",
        frozenset({"question_id", "answer", "bbox", "image", "file_name"}),
        frozenset({"segmentation", "iscrowd"}),
        "answer",
        "image",
        "xywh",
    ),
    Layout("qwen-vl", frozenset({"image", "sent", "bbox", "width", "height"}), frozenset(), "sent", "image", "xyxy"),
)
"""Recognised layouts, tried in order; a table matches one when it has every ``required`` column and, where
``any_of`` is not empty, one of those."""

LMMS_NOT_OFFICIAL = {
    ("refcoco", "val"): "lmms-lab's RefCOCO val holds 8,811 rows; the official (unc) val has 3,811 refs",
    ("refcocog", "val"): "lmms-lab's RefCOCOg val holds 7,573 rows; the official (umd) val has 2,573 refs",
    ("refcoco", "test"): "lmms-lab's RefCOCO test (5,000 rows) is no split of RefCOCO (unc), which has testA and testB",
}
"""lmms-lab splits that are not the paper's split of that name, and why."""


def detect_layout(columns: Iterable[str]) -> Layout | None:
    """The first of :data:`LAYOUTS` whose columns the table has, or None for a generic table.

    >>> detect_layout(["image", "sent", "bbox", "width", "height"]).name
    'qwen-vl'
    >>> detect_layout(["image", "expression", "bbox"]) is None
    True
    """
    present = set(columns)
    for layout in LAYOUTS:
        if layout.required <= present and (not layout.any_of or layout.any_of & present):
            return layout
    return None


def load_table(
    path: str | Path,
    images: str | Path | None = None,
    split: str | None = None,
    dataset: str | None = None,
    bbox_format: str = "auto",
) -> list[RefExample]:
    """Expressions of a Parquet or JSONL file (by extension), one row per box.

    Images are paths relative to ``images`` (default the file's folder) or inline bytes. The split and dataset
    come from ``split`` / ``dataset`` columns, else the arguments, else the file name
    (``val-00000-of-00004.parquet`` is ``val``; a path containing ``RefCOCOplus`` is ``refcoco+``).
    """
    import pandas as pd

    path = Path(path)
    if bbox_format not in ("auto", "xywh", "xyxy"):
        raise DatasetError(f"bbox_format is auto, xywh or xyxy, got {bbox_format!r}")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        frame = pd.read_json(path, lines=True, dtype=False)
    else:
        raise DatasetError(f"{path}: a table is a .parquet or .jsonl file")
    layout = detect_layout(frame.columns)
    text_column = layout.expression if layout else _first_column(frame.columns, EXPRESSION_COLUMNS, path, "expression")
    image_column = layout.image if layout else _first_column(frame.columns, IMAGE_COLUMNS, path, "image")
    if "bbox" not in frame.columns:
        raise DatasetError(f"{path}: no 'bbox' column")
    fmt = bbox_format if bbox_format != "auto" else (layout.bbox_format if layout else "xywh")
    source = layout.name if layout else "table"
    resolve = ImageResolver(images if images is not None else path.parent)
    default_split = split or guess_split(path)
    default_dataset = dataset or guess_dataset_name(path)
    split_by = split_by_of(path)
    examples = []
    for row_index, row in enumerate(frame.to_dict("records")):
        row_split = str(_value(row, "split", default=default_split))
        row_dataset = dataset_name(str(_value(row, "dataset", "dataset_name", default=default_dataset)), split_by)
        key = _value(row, "ref_id", "question_id", "id", default=row_index)
        where = f"{path} row {row_index + 1} ({key})"
        image_path, image_bytes = _row_image(row[image_column], resolve)
        width, height = _row_size(row, image_path, image_bytes)
        box = read_box(list(row["bbox"]), fmt, width, height, where, flag=True)
        caveat = LMMS_NOT_OFFICIAL.get((row_dataset, row_split)) if source == "lmms-lab" else None
        for k, (sentence_id, text) in enumerate(_expressions(row[text_column])):
            examples.append(
                RefExample(
                    id=f"{row_dataset}/{row_split}/{key}/{k if sentence_id is None else sentence_id}",
                    dataset=row_dataset,
                    split=row_split,
                    expression=text,
                    box=box,
                    width=width,
                    height=height,
                    image_path=image_path,
                    image_id=str(_value(row, "image_id", "file_name", default=key)),
                    image_bytes=image_bytes,
                    source=source,
                    bbox_format=fmt,
                    caveat=caveat,
                )
            )
    return examples


def table_expressions(path: str | Path) -> list[tuple[str, str]]:
    """(split column or "", expression) of every expression of a table, in order, without its images or boxes."""
    import pandas as pd

    path = Path(path)
    frame = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_json(path, lines=True, dtype=False)
    layout = detect_layout(frame.columns)
    column = layout.expression if layout else _first_column(frame.columns, EXPRESSION_COLUMNS, path, "expression")
    return [
        (str(_value(row, "split", default="")), text)
        for row in frame.to_dict("records")
        for _, text in _expressions(row[column])
    ]


def guess_split(path: Path) -> str:
    """The first part of the file name that names a split (parts are split at ``-``, ``_`` and ``.``;
    ``validation`` is ``val``), or "".

    >>> guess_split(Path("val-00000-of-00004.parquet")), guess_split(Path("refcoco+_testA.jsonl"))
    ('val', 'testA')
    >>> guess_split(Path("validation-00000-of-00001.parquet"))
    'val'
    """
    parts = ["val" if part == "validation" else part for part in re.split(r"[-_.]", path.name)]
    return next((part for part in parts if part in SPLITS), "")


def guess_dataset_name(path: Path) -> str:
    """``refcocog``, ``refcoco+`` or ``refcoco`` when the path names one, else the file's stem.

    >>> guess_dataset_name(Path("lmms-lab/RefCOCOplus/data/val-00000-of-00001.parquet"))
    'refcoco+'
    >>> guess_dataset_name(Path("data/refcoco_plus_unc_val-00000.parquet"))
    'refcoco+'
    """
    text = re.sub(r"[-_]?plus", "+", str(path).lower())
    for name in ("refcocog", "refcoco+"):
        if name in text:
            return name
    return "refcoco" if "refcoco" in text else path.stem


def _expressions(value: Any) -> list[tuple[Any, str]]:
    """(sentence id or None, expression) pairs of a cell: a string, a list of strings, or refer sentences."""
    if isinstance(value, str):
        return [(None, value)]
    pairs = []
    for item in value:
        if isinstance(item, dict):
            pairs.append((item.get("sent_id"), str(item["sent"])))
        else:
            pairs.append((None, str(item)))
    return pairs


def _first_column(columns: Iterable[str], candidates: Sequence[str], path: Path, what: str) -> str:
    present = set(columns)
    for name in candidates:
        if name in present:
            return name
    raise DatasetError(f"{path}: no {what} column; expected one of {', '.join(candidates)}")


def _row_image(value: Any, resolve: ImageResolver) -> tuple[str, bytes | None]:
    if isinstance(value, dict):
        if value.get("bytes"):
            return str(value.get("path") or ""), bytes(value["bytes"])
        value = value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return "", bytes(value)
    if not isinstance(value, str) or not value:
        raise DatasetError(f"a row's image is neither a path nor bytes: {type(value).__name__}")
    return resolve(value), None


def _row_size(row: dict[str, Any], image_path: str, image_bytes: bytes | None) -> tuple[int, int]:
    for w, h in (("width", "height"), ("image_width", "image_height")):
        if _value(row, w) is not None and _value(row, h) is not None:
            return int(row[w]), int(row[h])
    info = _value(row, "raw_image_info")
    if info is not None:
        info = json.loads(info) if isinstance(info, str) else info
        return int(info["width"]), int(info["height"])
    with Image.open(io.BytesIO(image_bytes) if image_bytes is not None else image_path) as image:
        return image.size  # the stored pixels, without EXIF rotation, as the official pipeline saw them


def _value(row: dict[str, Any], *columns: str, default: Any = None) -> Any:
    """The value of the first column present in the row and not missing (NaN in a mixed table), or ``default``."""
    for column in columns:
        value = row.get(column)
        if value is not None and not (isinstance(value, float) and value != value) and value != "":
            return value
    return default

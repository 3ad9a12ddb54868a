"""Referring-expression datasets, every format read into one record type, :class:`RefExample`.

Formats (each loader returns the expressions in file order):

- :func:`load_mdetr`: MDETR's ``finetune_refcoco*_{split}.json`` (COCO-like, one image entry per expression,
  its ``caption`` the expression), the files the Kosmos-2 paper evaluated on; also what ``python -m eval synth``
  writes. The split comes from the file name, the dataset from each entry's ``dataset_name``.
- :func:`load_refer`: the refer toolkit's ``refs(unc).p`` / ``refs(umd).p`` pickle with the COCO
  ``instances.json`` beside it; expressions are the sentences' ``sent`` field, as MDETR converted them. Pickles
  can run code when loaded: only load files from a source you trust.
- :func:`load_table`: Hugging Face style Parquet or JSONL exports (``lmms-lab/RefCOCO``: ``question_id``,
  ``image`` with inline bytes, ``answer`` holding the list of expressions, ``bbox`` as xywh), images inline or
  by path.

Images are looked up under ``--images``; for COCO file names also under its ``train2014/`` or ``val2014/``
folder, as unilm's ``cook_data.py`` does. Run ``python -m eval run --help`` for the command line.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from eval.refexp import xywh_to_xyxy
from serve.kosmos2.grounding import Box

EXPRESSION_COLUMNS = ("expression", "sent", "sentence", "caption", "referring_expression", "answer", "question")
"""Columns tried, in order, for the expression of a table row (a list in it means one row per expression)."""

SPLITS = ("train", "val", "test", "testA", "testB")
"""Split names of the refer toolkit's RefCOCO, RefCOCO+ and RefCOCOg."""

IMAGE_COLUMNS = ("image", "image_path", "file_name", "img_path")
"""Columns tried, in order, for a table row's image: a path, bytes, or a ``{"bytes", "path"}`` struct."""


@dataclass(frozen=True)
class RefExample:
    """One referring expression with its image and ground-truth box.

    ``id`` is unique within a run (dataset, split and the source's own ids); ``box`` is ``(x1, y1, x2, y2)`` in
    the pixels of the image as the annotation sizes it (``width`` x ``height``). An image is either a file
    (``image_path``) or bytes held inline (``image_bytes``, from a Parquet file).
    """

    id: str
    dataset: str
    split: str
    expression: str
    box: Box
    width: int
    height: int
    image_path: str
    image_id: str
    image_bytes: bytes | None = field(default=None, repr=False, compare=False)

    def read_image(self) -> bytes:
        """The encoded image."""
        if self.image_bytes is not None:
            return self.image_bytes
        return Path(self.image_path).read_bytes()


class DatasetError(ValueError):
    """An annotation file that cannot be read as the format it was given as; the message says why."""


def load_mdetr(path: str | Path, images: str | Path, split: str | None = None) -> list[RefExample]:
    """Expressions of an MDETR ``finetune_{dataset}_{split}.json`` file.

    Image entries and annotations are paired by position and their ids checked, as the official script does.
    ``split`` defaults to the file name's last ``_`` part.
    """
    path = Path(path)
    data = json.loads(path.read_text())
    name_match = re.fullmatch(r"(?:finetune_)?(.+)_([^_]+)", path.stem)
    split = split or (name_match.group(2) if name_match else path.stem)
    default_dataset = name_match.group(1) if name_match else path.stem
    entries, annotations = data.get("images"), data.get("annotations")
    if not isinstance(entries, list) or not isinstance(annotations, list) or len(entries) != len(annotations):
        raise DatasetError(f"{path}: an MDETR file has equally long 'images' and 'annotations' lists")
    resolve = ImageResolver(images)
    examples = []
    for entry, annotation in zip(entries, annotations):
        if entry["id"] != annotation["image_id"]:
            raise DatasetError(
                f"{path}: image entry {entry['id']} is paired with an annotation of {annotation['image_id']}"
            )
        dataset = entry.get("dataset_name", default_dataset)
        examples.append(
            RefExample(
                id=f"{dataset}/{split}/{entry['id']}",
                dataset=dataset,
                split=split,
                expression=entry["caption"],
                box=xywh_to_xyxy(annotation["bbox"]),
                width=int(entry["width"]),
                height=int(entry["height"]),
                image_path=resolve(entry["file_name"]),
                image_id=str(entry.get("original_id", entry["id"])),
            )
        )
    return examples


def load_refer(
    refs: str | Path,
    images: str | Path,
    instances: str | Path | None = None,
    splits: Sequence[str] | None = None,
    dataset: str | None = None,
) -> list[RefExample]:
    """Expressions of a refer-toolkit ``refs(*).p`` with its COCO ``instances.json`` (default: beside it).

    ``splits`` defaults to every split but ``train``; ``dataset`` to the folder name (``refcoco``, ...).
    """
    refs = Path(refs)
    instances = Path(instances) if instances else refs.parent / "instances.json"
    dataset = dataset or refs.parent.name
    with refs.open("rb") as f:
        data = pickle.load(f)
    coco = json.loads(instances.read_text())
    images_by_id = {image["id"]: image for image in coco["images"]}
    annotations_by_id = {annotation["id"]: annotation for annotation in coco["annotations"]}
    resolve = ImageResolver(images)
    examples = []
    for ref in data:
        if (splits is None and ref["split"] == "train") or (splits is not None and ref["split"] not in splits):
            continue
        image = images_by_id[ref["image_id"]]
        box = xywh_to_xyxy(annotations_by_id[ref["ann_id"]]["bbox"])
        for sentence in ref["sentences"]:
            examples.append(
                RefExample(
                    id=f"{dataset}/{ref['split']}/{ref['ref_id']}/{sentence['sent_id']}",
                    dataset=dataset,
                    split=ref["split"],
                    expression=sentence["sent"],
                    box=box,
                    width=int(image["width"]),
                    height=int(image["height"]),
                    image_path=resolve(image["file_name"]),
                    image_id=str(ref["image_id"]),
                )
            )
    return examples


def load_table(
    path: str | Path,
    images: str | Path | None = None,
    split: str | None = None,
    dataset: str | None = None,
    bbox_format: str = "xywh",
) -> list[RefExample]:
    """Expressions of a Parquet or JSONL file (by extension), one row per box.

    The expression is the first of :data:`EXPRESSION_COLUMNS` present (a list gives one expression each), the
    image the first of :data:`IMAGE_COLUMNS` (paths relative to ``images``, default the file's folder). The
    split and dataset come from ``split`` / ``dataset`` columns, else the arguments, else the file name
    (``val-00000-of-00004.parquet`` is ``val``; a path containing ``RefCOCOplus`` is ``refcoco+``).
    """
    import pandas as pd

    path = Path(path)
    if bbox_format not in ("xywh", "xyxy"):
        raise DatasetError(f"bbox_format is xywh or xyxy, got {bbox_format!r}")
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    elif path.suffix in (".jsonl", ".json"):
        frame = pd.read_json(path, lines=True, dtype=False)
    else:
        raise DatasetError(f"{path}: a table is a .parquet or .jsonl file")
    text_column = _first_column(frame.columns, EXPRESSION_COLUMNS, path, "expression")
    image_column = _first_column(frame.columns, IMAGE_COLUMNS, path, "image")
    if "bbox" not in frame.columns:
        raise DatasetError(f"{path}: no 'bbox' column")
    resolve = ImageResolver(images if images is not None else path.parent)
    default_split = split or guess_split(path)
    default_dataset = dataset or guess_dataset_name(path)
    examples = []
    for row_index, row in enumerate(frame.to_dict("records")):
        row_split = str(_value(row, "split", default=default_split))
        row_dataset = str(_value(row, "dataset", "dataset_name", default=default_dataset))
        image_path, image_bytes = _row_image(row[image_column], resolve)
        width, height = _row_size(row, image_path, image_bytes)
        bbox = [float(v) for v in row["bbox"]]
        box = xywh_to_xyxy(bbox) if bbox_format == "xywh" else (bbox[0], bbox[1], bbox[2], bbox[3])
        key = _value(row, "question_id", "id", default=row_index)
        texts = row[text_column]
        texts = [texts] if isinstance(texts, str) else list(texts)
        for k, text in enumerate(texts):
            examples.append(
                RefExample(
                    id=f"{row_dataset}/{row_split}/{key}/{k}",
                    dataset=row_dataset,
                    split=row_split,
                    expression=str(text),
                    box=box,
                    width=width,
                    height=height,
                    image_path=image_path,
                    image_id=str(_value(row, "image_id", "file_name", default=key)),
                    image_bytes=image_bytes,
                )
            )
    return examples


def guess_split(path: Path) -> str:
    """The first part of the file name that names a split (parts are split at ``-``, ``_`` and ``.``), or "".

    >>> guess_split(Path("val-00000-of-00004.parquet")), guess_split(Path("refcoco+_testA.jsonl"))
    ('val', 'testA')
    """
    parts = re.split(r"[-_.]", path.name)
    return next((part for part in parts if part in SPLITS), "")


def guess_dataset_name(path: Path) -> str:
    """``refcocog``, ``refcoco+`` or ``refcoco`` when the path names one, else the file's stem.

    >>> guess_dataset_name(Path("lmms-lab/RefCOCOplus/data/val-00000-of-00001.parquet"))
    'refcoco+'
    """
    text = str(path).lower()
    for marker, name in (("refcocog", "refcocog"), ("refcoco+", "refcoco+"), ("refcocoplus", "refcoco+")):
        if marker in text:
            return name
    return "refcoco" if "refcoco" in text else path.stem


class ImageResolver:
    """Finds an image file under a folder: ``DIR/name``, else ``DIR/train2014/name`` or ``DIR/val2014/name``."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __call__(self, name: str) -> str:
        direct = self.root / name
        if direct.is_file():
            return str(direct)
        coco = self.root / ("train2014" if "train2014" in name else "val2014") / Path(name).name
        if coco.is_file():
            return str(coco)
        raise DatasetError(f"image {name!r} is neither {direct} nor {coco}; pass the folder that holds it as --images")


def check_unique(examples: Iterable[RefExample]) -> None:
    """Raise :class:`DatasetError` when two examples share an id (the key of resumable predictions)."""
    seen: set[str] = set()
    for example in examples:
        if example.id in seen:
            raise DatasetError(f"two expressions share the id {example.id!r}; do not pass the same file twice")
        seen.add(example.id)


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
    with Image.open(io.BytesIO(image_bytes) if image_bytes is not None else image_path) as image:
        return image.size  # the stored pixels, without EXIF rotation, as the official pipeline saw them


def _value(row: dict[str, Any], *columns: str, default: Any = None) -> Any:
    """The value of the first column present in the row and not missing (NaN in a mixed table), or ``default``."""
    for column in columns:
        value = row.get(column)
        if value is not None and not (isinstance(value, float) and value != value) and value != "":
            return value
    return default

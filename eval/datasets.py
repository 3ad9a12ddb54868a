"""Referring-expression datasets, every format read into one record type, :class:`RefExample`.

Formats (each loader returns the expressions in file order; tables are read by ``eval.tables``):

- :func:`load_mdetr`: MDETR's ``finetune_refcoco*_{split}.json`` / ``final_*_{split}.json`` (COCO-like, one image
  entry per expression, its ``caption`` the expression, boxes ``xywh``), the files the Kosmos-2 paper evaluated
  on; also what ``python -m eval synth`` writes. The split comes from the file name, the dataset from each
  entry's ``dataset_name``.
- :func:`load_refer`: the refer toolkit's ``refs(unc).p`` / ``refs(umd).p`` / ``refs(google).p`` pickle with the
  COCO ``instances.json`` beside it (boxes ``xywh``); expressions are the sentences' ``sent`` field, as MDETR
  converted them. Pickles can run code when loaded: only load files from a source you trust.

Every box is checked against its image's size in pixels (:func:`read_box`), so that a file read in the wrong
box format fails with the row and the likely format instead of being scored wrong. Dataset names are made
canonical (:func:`dataset_name`): a folder called ``RefCOCO`` is ``refcoco``, and a split other than the
paper's (RefCOCO and RefCOCO+ by ``unc``, RefCOCOg by ``umd``) gets its own name, ``refcocog-google``, so it is
never set beside the paper's numbers. Images are looked up under ``--images``, also under its ``train2014/`` or
``val2014/`` folder, as unilm's ``cook_data.py`` does. Run ``python -m eval run --help`` for the command line.
"""

from __future__ import annotations

import json
import math
import pickle
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from eval.refexp import xywh_to_xyxy
from serve.kosmos2.grounding import Box

SPLITS = ("train", "val", "test", "testA", "testB")
"""Split names of the refer toolkit's RefCOCO, RefCOCO+ and RefCOCOg."""

PAPER_SPLIT_BY = {"refcoco": "unc", "refcoco+": "unc", "refcocog": "umd"}
"""The partition of each dataset that the Kosmos-2 paper (and MDETR's files) evaluated on."""

BOX_FORMATS = ("xywh", "xyxy")

BOX_TOLERANCE = 1.0
"""Pixels a box may reach past its image's edge (COCO boxes are floats that can overshoot by a fraction)."""


@dataclass(frozen=True)
class RefExample:
    """One referring expression with its image and ground-truth box.

    ``id`` is unique within a run (dataset, split and the source's own ids); ``box`` is ``(x1, y1, x2, y2)`` in
    the pixels of the image as the annotation sizes it (``width`` x ``height``). An image is either a file
    (``image_path``) or bytes held inline (``image_bytes``, from a Parquet file). ``source`` names the layout it
    was read from, ``bbox_format`` how its box was written there, and ``caveat`` says why its split must not be
    set beside the paper's split of the same name.
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
    source: str = ""
    bbox_format: str = "xywh"
    caveat: str | None = None

    def read_image(self) -> bytes:
        """The encoded image."""
        if self.image_bytes is not None:
            return self.image_bytes
        return Path(self.image_path).read_bytes()


class DatasetError(ValueError):
    """An annotation file that cannot be read as the format it was given as; the message says why."""


def dataset_name(name: str, split_by: str | None = None) -> str:
    """The name a dataset is reported by: ``refcoco``, ``refcoco+``, ``refcocog`` whatever the spelling, with the
    partition appended when it is not the paper's; other names are kept as given.

    >>> dataset_name("RefCOCO"), dataset_name("refcoco_plus"), dataset_name("RefCOCOg", "umd")
    ('refcoco', 'refcoco+', 'refcocog')
    >>> dataset_name("refcocog", "google"), dataset_name("refcoco", "google"), dataset_name("synth", "google")
    ('refcocog-google', 'refcoco-google', 'synth')
    """
    key = re.sub(r"[^a-z+]", "", name.lower()).replace("plus", "+")
    if key not in PAPER_SPLIT_BY:
        return name
    return key if split_by in (None, PAPER_SPLIT_BY[key]) else f"{key}-{split_by}"


def split_by_of(path: Path) -> str | None:
    """The partition (``unc``, ``umd``, ``google``) that a file's name or its two parent folders name, if any.

    >>> split_by_of(Path("refcocog/refs(google).p")), split_by_of(Path("data/refcocog_umd_val-0.parquet"))
    ('google', 'umd')
    """
    parts = [path.name, path.parent.name, path.parent.parent.name]
    found = re.search(r"(?<![a-z])(unc|umd|google)(?![a-z])", " ".join(parts).lower())
    return found.group(1) if found else None


def read_box(values: Sequence[float], fmt: str, width: float, height: float, where: str, flag: bool = False) -> Box:
    """A box written as ``fmt`` (``xywh`` or ``xyxy``), as ``(x1, y1, x2, y2)`` pixels inside the image.

    Raises :class:`DatasetError` naming ``where`` when the box does not fit the ``width`` x ``height`` image
    (within :data:`BOX_TOLERANCE`), and the format its numbers fit if they fit the other one (with the
    ``--bbox-format`` to pass when ``flag``).

    >>> read_box([10, 20, 30, 40], "xywh", 64, 64, "row 1")
    (10.0, 20.0, 40.0, 60.0)
    >>> read_box([40, 10, 60, 40], "xywh", 64, 48, "row 2", flag=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    eval.datasets.DatasetError: row 2: bbox [40, 10, 60, 40] read as xywh is (40, 10, 100, 50), ... xyxy
    """
    numbers = [float(v) for v in values]
    if len(numbers) != 4 or not all(math.isfinite(v) for v in numbers):
        raise DatasetError(f"{where}: a bbox is 4 finite numbers, got {list(values)}")
    box = _as_xyxy(numbers, fmt)
    if _fits(box, width, height):
        return box
    other = next(f for f in BOX_FORMATS if f != fmt)
    if _fits(_as_xyxy(numbers, other), width, height):
        hint = f"its numbers fit as {other}" + (f": pass --bbox-format {other}" if flag else "")
    else:
        hint = "check the annotation and the image it names"
    written = ", ".join(f"{v:g}" for v in numbers)
    read = ", ".join(f"{v:g}" for v in box)
    raise DatasetError(
        f"{where}: bbox [{written}] read as {fmt} is ({read}), outside the {width:g}x{height:g} image; {hint}"
    )


def _as_xyxy(numbers: Sequence[float], fmt: str) -> Box:
    if fmt not in BOX_FORMATS:
        raise DatasetError(f"a bbox format is xywh or xyxy, got {fmt!r}")
    return xywh_to_xyxy(numbers) if fmt == "xywh" else (numbers[0], numbers[1], numbers[2], numbers[3])


def _fits(box: Box, width: float, height: float) -> bool:
    x1, y1, x2, y2 = box
    t = BOX_TOLERANCE
    return -t <= x1 <= x2 <= width + t and -t <= y1 <= y2 <= height + t


def load_mdetr(path: str | Path, images: str | Path, split: str | None = None) -> list[RefExample]:
    """Expressions of an MDETR ``finetune_{dataset}_{split}.json`` (or ``final_..._{split}.json``) file.

    Image entries and annotations are paired by position and their ids checked, as the official script does.
    ``split`` defaults to the file name's last ``_`` part.
    """
    path = Path(path)
    data = json.loads(path.read_text())
    name_match = re.fullmatch(r"(?:finetune_|final_)?(.+)_([^_]+)", path.stem)
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
        dataset = dataset_name(entry.get("dataset_name", default_dataset))
        width, height = int(entry["width"]), int(entry["height"])
        examples.append(
            RefExample(
                id=f"{dataset}/{split}/{entry['id']}",
                dataset=dataset,
                split=split,
                expression=entry["caption"],
                box=read_box(annotation["bbox"], "xywh", width, height, f"{path} image entry {entry['id']}"),
                width=width,
                height=height,
                image_path=resolve(entry["file_name"]),
                image_id=str(entry.get("original_id", entry["id"])),
                source="mdetr",
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

    ``splits`` defaults to every split but ``train``; ``dataset`` to the folder name (``refcoco``, ``RefCOCO+``
    ...), made canonical, with the partition the file name gives appended when it is not the paper's
    (``refcocog/refs(google).p`` is ``refcocog-google``).
    """
    refs = Path(refs)
    instances = Path(instances) if instances else refs.parent / "instances.json"
    dataset = dataset_name(dataset or refs.parent.name, split_by_of(Path(refs.name)))
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
        width, height = int(image["width"]), int(image["height"])
        where = f"{instances} annotation {ref['ann_id']} (ref {ref['ref_id']})"
        box = read_box(annotations_by_id[ref["ann_id"]]["bbox"], "xywh", width, height, where)
        for sentence in ref["sentences"]:
            examples.append(
                RefExample(
                    id=f"{dataset}/{ref['split']}/{ref['ref_id']}/{sentence['sent_id']}",
                    dataset=dataset,
                    split=ref["split"],
                    expression=sentence["sent"],
                    box=box,
                    width=width,
                    height=height,
                    image_path=resolve(image["file_name"]),
                    image_id=str(ref["image_id"]),
                    source="refer",
                )
            )
    return examples


class ImageResolver:
    """Finds an image file under a folder: ``DIR/name``, ``DIR/basename``, or ``DIR/train2014/basename`` /
    ``DIR/val2014/basename`` (by the name's COCO split), so that paths written on another machine still resolve."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def __call__(self, name: str) -> str:
        base = Path(name).name
        coco = self.root / ("train2014" if "train2014" in name else "val2014") / base
        candidates = [self.root / name, self.root / base, coco]
        for candidate in candidates:
            if candidate.is_file():
                return str(candidate)
        raise DatasetError(
            f"image {name!r} is neither {candidates[0]} nor {coco}; pass the folder that holds it as --images"
        )


def check_unique(examples: Iterable[RefExample]) -> None:
    """Raise :class:`DatasetError` when two examples share an id (the key of resumable predictions)."""
    seen: set[str] = set()
    for example in examples:
        if example.id in seen:
            raise DatasetError(f"two expressions share the id {example.id!r}; do not pass the same file twice")
        seen.add(example.id)

"""Each dataset loader on the hand-made fixtures in tests/fixtures/eval, and the synthetic set's guarantees."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.datasets import DatasetError, ImageResolver, check_unique, load_mdetr, load_refer, load_table
from eval.synth import COLOURS, KINDS, describe, random_scene, write_synthetic

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "eval"
IMAGES = FIXTURES / "images"
IMAGE_9 = str(IMAGES / "COCO_train2014_000000000009.png")
IMAGE_25 = str(IMAGES / "COCO_train2014_000000000025.png")
IMAGE_30 = str(IMAGES / "COCO_train2014_000000000030.png")


def summary(examples) -> list[tuple]:
    return [(e.id, e.dataset, e.split, e.expression, e.box, e.width, e.height) for e in examples]


def test_mdetr_file():
    examples = load_mdetr(FIXTURES / "finetune_refcoco_val.json", IMAGES)
    assert summary(examples) == [
        ("refcoco/val/0", "refcoco", "val", "red box left", (4.0, 6.0, 24.0, 30.0), 64, 48),
        ("refcoco/val/1", "refcoco", "val", "the red one", (4.0, 6.0, 24.0, 30.0), 64, 48),
        ("refcoco/val/2", "refcoco", "val", "white square", (10.0, 10.0, 40.0, 40.0), 50, 50),
    ]
    assert [e.image_path for e in examples] == [IMAGE_9, IMAGE_9, IMAGE_30]
    assert examples[0].image_id == "9"
    assert examples[0].read_image() == Path(IMAGE_9).read_bytes()


def test_mdetr_pairs_images_and_annotations_by_position_like_the_official_script(tmp_path):
    data = json.loads((FIXTURES / "finetune_refcoco_val.json").read_text())
    data["annotations"].reverse()
    path = tmp_path / "finetune_refcoco_val.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="paired with an annotation"):
        load_mdetr(path, IMAGES)


def test_refer_toolkit_layout_skips_train_by_default():
    examples = load_refer(FIXTURES / "refcoco" / "refs(unc).p", IMAGES)
    assert summary(examples) == [
        ("refcoco/val/0/0", "refcoco", "val", "red box left", (4.0, 6.0, 24.0, 30.0), 64, 48),
        ("refcoco/val/0/1", "refcoco", "val", "the red one", (4.0, 6.0, 24.0, 30.0), 64, 48),
        ("refcoco/testA/1/2", "refcoco", "testA", "blue box", (40.0, 10.0, 60.0, 40.0), 64, 48),
        ("refcoco/testB/3/4", "refcoco", "testB", "yellow bar", (10.0, 35.0, 20.0, 55.0), 40, 60),
    ]
    assert [e.image_path for e in examples] == [IMAGE_9, IMAGE_9, IMAGE_9, IMAGE_25]


def test_refer_splits_can_be_chosen():
    examples = load_refer(FIXTURES / "refcoco" / "refs(unc).p", IMAGES, splits=["train", "testB"], dataset="x")
    assert [(e.id, e.expression) for e in examples] == [("x/train/2/3", "green top"), ("x/testB/3/4", "yellow bar")]


def test_parquet_with_inline_images_and_lists_of_expressions():
    examples = load_table(FIXTURES / "refcoco+_testA.parquet")
    assert summary(examples) == [
        ("refcoco+/testA/q9-102/0", "refcoco+", "testA", "blue box", (40.0, 10.0, 60.0, 40.0), 64, 48),
        ("refcoco+/testA/q9-102/1", "refcoco+", "testA", "box on the right", (40.0, 10.0, 60.0, 40.0), 64, 48),
        ("refcoco+/testA/q25-202/0", "refcoco+", "testA", "yellow bar", (10.0, 35.0, 20.0, 55.0), 40, 60),
    ]
    image = Image.open(io.BytesIO(examples[0].read_image()))
    assert image.size == (64, 48)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(IMAGE_9)))


def test_jsonl_with_image_paths_relative_to_the_file():
    examples = load_table(FIXTURES / "refcocog_val.jsonl")
    assert summary(examples) == [
        ("refcocog/val/7/0", "refcocog", "val", "green top", (5.0, 5.0, 35.0, 25.0), 40, 60),
        ("refcocog/val/8/0", "refcocog", "val", "white square", (10.0, 10.0, 40.0, 40.0), 50, 50),  # size read
    ]
    assert [e.image_path for e in examples] == [IMAGE_25, IMAGE_30]
    assert examples[0].image_bytes is None


def test_table_options(tmp_path):
    path = tmp_path / "export.jsonl"
    path.write_text(json.dumps({"image": "COCO_train2014_000000000030.png", "expression": "it", "bbox": [1, 2, 3, 4]}))
    (example,) = load_table(path, IMAGES, split="val", dataset="mine", bbox_format="xyxy")
    assert (example.id, example.box, example.split, example.dataset) == (
        "mine/val/0/0",
        (1.0, 2.0, 3.0, 4.0),
        "val",
        "mine",
    )


def test_missing_images_and_columns_are_explained(tmp_path):
    with pytest.raises(DatasetError, match="pass the folder that holds it as --images"):
        load_mdetr(FIXTURES / "finetune_refcoco_val.json", tmp_path)
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"image": "a.png", "bbox": [0, 0, 1, 1]}))
    with pytest.raises(DatasetError, match="no expression column"):
        load_table(path)


def test_coco_subfolders_are_searched(tmp_path):
    (tmp_path / "train2014").mkdir()
    (tmp_path / "train2014" / "COCO_train2014_000000000009.jpg").write_bytes(b"x")
    found = ImageResolver(tmp_path)("COCO_train2014_000000000009.jpg")
    assert found == str(tmp_path / "train2014" / "COCO_train2014_000000000009.jpg")


def test_ids_must_be_unique():
    examples = load_mdetr(FIXTURES / "finetune_refcoco_val.json", IMAGES)
    with pytest.raises(DatasetError, match="share the id"):
        check_unique(examples + examples[:1])


def test_synthetic_scenes_are_unambiguous_and_true():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = random_scene(rng)
        assert 2 <= len(scene.shapes) <= 4
        assert len({(s.colour, s.kind) for s in scene.shapes}) == len(scene.shapes)
        for shape in scene.shapes:
            x1, y1, x2, y2 = shape.box
            assert 0 <= x1 < x2 <= scene.width and 0 <= y1 < y2 <= scene.height
            expression = describe(shape, scene.width, rng)
            assert f"{shape.colour} {shape.kind}" in expression and shape.colour in COLOURS and shape.kind in KINDS
            centre = (x1 + x2) / 2
            if "on the left" in expression:
                assert centre < scene.width / 3
            if "on the right" in expression:
                assert centre > 2 * scene.width / 3


def test_synthetic_set_is_deterministic_and_loads(tmp_path):
    first = write_synthetic(tmp_path / "a", n=12, seed=5)
    second = write_synthetic(tmp_path / "b", n=12, seed=5)
    assert first.read_text() == second.read_text()
    assert sorted(p.read_bytes() for p in (tmp_path / "a" / "images").iterdir()) == sorted(
        p.read_bytes() for p in (tmp_path / "b" / "images").iterdir()
    )
    examples = load_mdetr(first, tmp_path / "a" / "images")
    assert len(examples) == 12 and {e.dataset for e in examples} == {"synth"} and {e.split for e in examples} == {"val"}
    for example in examples:
        with Image.open(example.image_path) as image:
            assert image.size == (example.width, example.height)
            x1, y1, x2, y2 = (int(v) for v in example.box)
            inside = np.asarray(image.convert("RGB"))[y1:y2, x1:x2].reshape(-1, 3)
        colour = next(c for c in COLOURS if c in example.expression.split())
        assert (inside == COLOURS[colour]).all(axis=1).any()  # the named shape is drawn inside its box

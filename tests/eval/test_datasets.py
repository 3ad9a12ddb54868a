"""Each dataset loader on the fixtures in tests/fixtures/eval, written in the exact layouts of the public files
(refer toolkit, MDETR, lmms-lab and jxu124 Parquet, Qwen-VL/InternVL JSONL); boxes checked against the images;
dataset names as the paper's table knows them; the clean-up audit; and the synthetic set's guarantees."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eval.audit import audit, clean_up
from eval.datasets import DatasetError, ImageResolver, check_unique, load_mdetr, load_refer
from eval.synth import COLOURS, KINDS, describe, random_scene, write_synthetic
from eval.tables import load_table

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


LMMS = FIXTURES / "lmms-lab"
JXU124 = FIXTURES / "jxu124" / "refcoco" / "data" / "validation-00000-of-00001.parquet"
QWEN = FIXTURES / "qwen-vl" / "refcoco_testA.jsonl"


def test_lmms_lab_parquet_with_inline_images_and_lists_of_expressions():
    examples = load_table(LMMS / "RefCOCOplus" / "data" / "testA-00000-of-00001.parquet")
    assert summary(examples) == [
        ("refcoco+/testA/102/0", "refcoco+", "testA", "blue box", (40.0, 10.0, 60.0, 40.0), 64, 48),
        ("refcoco+/testA/102/1", "refcoco+", "testA", "box on the right", (40.0, 10.0, 60.0, 40.0), 64, 48),
        ("refcoco+/testA/202/0", "refcoco+", "testA", "yellow bar", (10.0, 35.0, 20.0, 55.0), 40, 60),
    ]
    assert {(e.source, e.bbox_format, e.caveat) for e in examples} == {("lmms-lab", "xywh", None)}
    image = Image.open(io.BytesIO(examples[0].read_image()))
    assert image.size == (64, 48)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(IMAGE_9)))


def test_lmms_lab_refcoco_val_is_marked_as_not_the_official_val():
    examples = load_table(LMMS / "RefCOCO" / "data" / "val-00000-of-00001.parquet")
    assert [(e.dataset, e.split, e.box) for e in examples] == [("refcoco", "val", (4.0, 6.0, 24.0, 30.0))] * 2
    assert all("8,811" in e.caveat and "3,811" in e.caveat for e in examples)


def test_jxu124_parquet_reads_sentences_and_xyxy_boxes():
    examples = load_table(JXU124, IMAGES)
    assert summary(examples) == [
        ("refcoco/val/0/0", "refcoco", "val", "red box left", (4.0, 6.0, 24.0, 30.0), 64, 48),
        ("refcoco/val/0/1", "refcoco", "val", "the red one", (4.0, 6.0, 24.0, 30.0), 64, 48),
        ("refcoco/val/1/2", "refcoco", "val", "blue box", (40.0, 10.0, 60.0, 40.0), 64, 48),
    ]
    assert [e.image_path for e in examples] == [IMAGE_9] * 3  # image_path is coco/train2014/...
    assert {(e.source, e.bbox_format) for e in examples} == {("jxu124", "xyxy")}
    refer = {e.id: e for e in load_refer(FIXTURES / "refcoco" / "refs(unc).p", IMAGES)}
    assert all((refer[e.id].expression, refer[e.id].box) == (e.expression, e.box) for e in examples[:2])


def test_qwen_vl_jsonl_reads_xyxy_boxes():
    examples = load_table(QWEN, IMAGES)
    assert summary(examples) == [
        ("refcoco/testA/0/0", "refcoco", "testA", "blue box", (40.0, 10.0, 60.0, 40.0), 64, 48),
        ("refcoco/testA/1/0", "refcoco", "testA", "yellow bar", (10.0, 35.0, 20.0, 55.0), 40, 60),
        ("refcoco/testA/2/0", "refcoco", "testA", "red box , left", (4.0, 6.0, 24.0, 30.0), 64, 48),
    ]
    assert [e.image_path for e in examples] == [IMAGE_9, IMAGE_25, IMAGE_9]
    assert {(e.source, e.bbox_format) for e in examples} == {("qwen-vl", "xyxy")}


def test_a_box_read_in_the_wrong_format_is_an_error_naming_the_row_and_the_format(tmp_path):
    with pytest.raises(DatasetError, match=r"refcoco_testA.jsonl row 1 .*outside the 64x48 image.*--bbox-format xyxy"):
        load_table(QWEN, IMAGES, bbox_format="xywh")
    path = tmp_path / "export.jsonl"  # a layout of no known export: xywh unless told, and checked
    rows = [
        {"image": "COCO_train2014_000000000009.png", "expression": "x", "bbox": b}
        for b in ([1, 2, 3, 4], [40, 10, 60, 40])
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DatasetError, match=r"row 2 .*its numbers fit as xyxy: pass --bbox-format xyxy"):
        load_table(path, IMAGES)
    assert [e.box for e in load_table(path, IMAGES, bbox_format="xyxy")] == [(1, 2, 3, 4), (40, 10, 60, 40)]
    with pytest.raises(DatasetError, match=r"row 1 .*as xyxy is \(40, 10, 20, 30\).*its numbers fit as xywh"):
        load_table(LMMS / "RefCOCOplus" / "data" / "testA-00000-of-00001.parquet", bbox_format="xyxy")


def test_refer_and_mdetr_boxes_are_checked_against_their_images(tmp_path):
    folder = shutil.copytree(FIXTURES / "refcoco", tmp_path / "refcoco")
    instances = json.loads((folder / "instances.json").read_text())
    instances["annotations"][1]["bbox"] = [40, 10, 60, 40]  # xyxy where COCO writes xywh
    (folder / "instances.json").write_text(json.dumps(instances))
    with pytest.raises(DatasetError, match=r"annotation 102 \(ref 1\).*outside the 64x48 image"):
        load_refer(folder / "refs(unc).p", IMAGES)
    data = json.loads((FIXTURES / "finetune_refcoco_val.json").read_text())
    data["images"][2]["width"] = 30
    path = tmp_path / "finetune_refcoco_val.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"image entry 2: .*outside the 30x50 image"):
        load_mdetr(path, IMAGES)


def test_refcocog_partitions_are_told_apart():
    umd = load_refer(FIXTURES / "refcocog" / "refs(umd).p", IMAGES)
    assert [(e.id, e.expression) for e in umd] == [
        ("refcocog/val/0/10", "the red box , on the left"),
        ("refcocog/test/1/11", "the blue box 's right edge"),
        ("refcocog/test/1/12", "a blue box"),
    ]
    google = load_refer(FIXTURES / "refcocog" / "refs(google).p", IMAGES)
    assert [(e.id, e.dataset) for e in google] == [("refcocog-google/val/0/10", "refcocog-google")]
    assert {e.dataset for e in load_refer(FIXTURES / "refcocog" / "refs(google).p", IMAGES, dataset="refcocog")} == {
        "refcocog-google"
    }


def test_dataset_names_are_canonical_whatever_the_folder(tmp_path):
    folder = shutil.copytree(FIXTURES / "refcoco", tmp_path / "RefCOCO")
    assert {e.dataset for e in load_refer(folder / "refs(unc).p", IMAGES)} == {"refcoco"}
    plus = shutil.copytree(FIXTURES / "refcoco", tmp_path / "RefCOCO+")
    assert {e.dataset for e in load_refer(plus / "refs(unc).p", IMAGES)} == {"refcoco+"}
    data = json.loads((FIXTURES / "finetune_refcoco_val.json").read_text())
    for entry in data["images"]:
        entry["dataset_name"] = "RefCOCO"
    path = tmp_path / "finetune_refcoco_val.json"
    path.write_text(json.dumps(data))
    assert {e.dataset for e in load_mdetr(path, IMAGES)} == {"refcoco"}


def test_table_options(tmp_path):
    path = tmp_path / "export.jsonl"
    path.write_text(json.dumps({"image": "COCO_train2014_000000000030.png", "expression": "it", "bbox": [1, 2, 3, 4]}))
    (example,) = load_table(path, IMAGES, split="val", dataset="mine", bbox_format="xyxy")
    assert (example.id, example.box, example.split, example.dataset, example.width) == (
        "mine/val/0/0",
        (1.0, 2.0, 3.0, 4.0),
        "val",
        "mine",
        50,  # read from the image
    )


def test_the_audit_counts_expressions_the_clean_up_would_change():
    from transformers import PreTrainedTokenizerBase

    for text in ("man , left", "it 's here . really ?", "is n't it ! yes", "a ' b 've 're 'm"):
        assert clean_up(text) == PreTrainedTokenizerBase.clean_up_tokenization(None, text)
    results = audit([FIXTURES / "refcocog" / "refs(umd).p", QWEN, FIXTURES / "finetune_refcoco_val.json", JXU124])
    assert [(Path(r.path).name, r.split, r.n, r.touched) for r in results] == [
        ("refs(umd).p", "val", 1, 1),
        ("refs(umd).p", "test", 2, 1),
        ("refs(umd).p", "train", 1, 0),
        ("refcoco_testA.jsonl", "testA", 3, 1),
        ("finetune_refcoco_val.json", "val", 3, 0),
        ("validation-00000-of-00001.parquet", "val", 3, 0),
    ]
    assert results[1].examples == ["the blue box 's right edge"]


def test_missing_images_and_columns_are_explained(tmp_path):
    with pytest.raises(DatasetError, match="pass the folder that holds it as --images"):
        load_mdetr(FIXTURES / "finetune_refcoco_val.json", tmp_path)
    path = tmp_path / "x.jsonl"
    path.write_text(json.dumps({"image": "a.png", "bbox": [0, 0, 1, 1]}))
    with pytest.raises(DatasetError, match="no expression column"):
        load_table(path)


def test_coco_subfolders_and_other_machines_paths_are_searched(tmp_path):
    (tmp_path / "train2014").mkdir()
    (tmp_path / "train2014" / "COCO_train2014_000000000009.jpg").write_bytes(b"x")
    found = ImageResolver(tmp_path)("COCO_train2014_000000000009.jpg")
    assert found == str(tmp_path / "train2014" / "COCO_train2014_000000000009.jpg")
    elsewhere = ImageResolver(tmp_path)("/data/coco/train2014/COCO_train2014_000000000009.jpg")
    assert elsewhere == found


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

"""End to end on a synthetic set and the public-layout fixtures: the reference predictors score their exact
expected values (the grid round trip, the grid's true ceiling found by exhaustive search, the whole image), the
engine predictor runs the tiny model in float32, every output file agrees with the others, a rerun scores the
stored answers against the annotations given now, and the report keeps what is not the paper's split out of the
paper's table."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest

from eval.__main__ import build_parser, main
from eval.datasets import load_mdetr, load_refer
from eval.predictors import EnginePredictor
from eval.runner import evaluate
from eval.synth import write_synthetic
from serve.kosmos2.grounding import patch_indices_to_box
from tests.helpers import check_consistent, read_outputs

N = 80
FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "eval"


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synth"), n=N, seed=11)


def plain_iou(a, b) -> float:
    inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def grid_box(x1: float, y1: float, x2: float, y2: float) -> tuple[float, ...]:
    """A normalized box after Kosmos-2's 32x32 encoding and decoding, written out from the paper's description."""
    left, top = math.floor(x1 * 32), math.floor(y1 * 32)
    right, bottom = math.ceil(x2 * 32 - 1), math.ceil(y2 * 32 - 1)
    if left == right or top == bottom:
        return (left / 32, top / 32, (right + 1) / 32, (bottom + 1) / 32)
    return ((left + 0.5) / 32, (top + 0.5) / 32, (right + 0.5) / 32, (bottom + 0.5) / 32)


def every_decodable_box() -> np.ndarray:
    """The box of each of the 1024 x 1024 pairs of patch-index tokens, normalized, shape (1048576, 4)."""
    cells = range(1024)
    return np.array([patch_indices_to_box(first, second) for first in cells for second in cells])


def best_iou(boxes: np.ndarray, gt: tuple[float, ...], w: int, h: int) -> float:
    """The highest IoU with ``gt`` (pixels) of any decodable box, by exhaustive search."""
    x1, y1, x2, y2 = boxes[:, 0] * w, boxes[:, 1] * h, boxes[:, 2] * w, boxes[:, 3] * h
    inter = np.clip(np.minimum(x2, gt[2]) - np.maximum(x1, gt[0]), 0, None)
    inter *= np.clip(np.minimum(y2, gt[3]) - np.maximum(y1, gt[1]), 0, None)
    area = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    return float(np.max(inter / (area + (gt[2] - gt[0]) * (gt[3] - gt[1]) - inter)))


def expected_counts(annotation_file: Path) -> dict[str, int]:
    data = json.loads(annotation_file.read_text())
    boxes = every_decodable_box()
    roundtrip = ceiling = whole = 0
    for entry, annotation in zip(data["images"], data["annotations"]):
        w, h = entry["width"], entry["height"]
        x, y, bw, bh = annotation["bbox"]
        gt = (x, y, x + bw, y + bh)
        box = grid_box(x / w, y / h, (x + bw) / w, (y + bh) / h)
        roundtrip += plain_iou((box[0] * w, box[1] * h, box[2] * w, box[3] * h), gt) >= 0.5
        ceiling += best_iou(boxes, gt, w, h) >= 0.5
        whole += plain_iou((0, 0, w, h), gt) >= 0.5
    return {"roundtrip": roundtrip, "ceiling": ceiling, "whole-image": whole}


@pytest.fixture(scope="module")
def counts(synthetic) -> dict[str, int]:
    return expected_counts(synthetic)


@pytest.mark.parametrize("predictor", ["roundtrip", "ceiling", "whole-image"])
def test_reference_predictors_score_exactly(synthetic, counts, tmp_path, predictor):
    out = tmp_path / predictor
    args = ["run", "--annotations", str(synthetic), "--images", str(synthetic.parent / "images")]
    assert main([*args, "--predictor", predictor, "--out", str(out), "--no-progress"]) == 0
    _, summary = check_consistent(out, N)
    assert summary["correct"] == counts[predictor]
    assert summary["no_box"] == 0 and summary["errors"] == 0 and summary["complete"]
    assert summary["per_split"][0]["dataset"] == "synth" and summary["per_split"][0]["split"] == "val"
    assert summary["dtype"] is None and "no model runs" in (out / "report.md").read_text()


def test_the_round_trip_is_below_the_grids_ceiling(counts):
    assert 0.7 * N < counts["roundtrip"] < counts["ceiling"] <= N  # small shapes lose to the grid's round trip
    assert counts["whole-image"] < 0.1 * N


def test_per_split_reporting_limit_and_missing_images(tmp_path, capsys):
    val = write_synthetic(tmp_path / "set", n=5, seed=3, split="val")
    test_a = write_synthetic(tmp_path / "set", n=4, seed=4, split="testA")
    args = ["run", "--annotations", str(val), str(test_a), "--predictor", "roundtrip", "--no-progress"]
    assert main([*args, "--images", str(tmp_path), "--out", str(tmp_path / "x")]) == 2
    assert "pass the folder that holds it as --images" in capsys.readouterr().err
    out = tmp_path / "out"
    assert main([*args, "--images", str(tmp_path / "set" / "images"), "--out", str(out), "--limit", "7"]) == 0
    _, summary = check_consistent(out, 7)
    assert [(s["split"], s["n"]) for s in summary["per_split"]] == [("val", 5), ("testA", 2)]
    assert summary["config"]["limit"] == 7


def test_engine_predictor_on_the_tiny_model(synthetic, tmp_path, loaded, hf_engine):
    examples = load_mdetr(synthetic, synthetic.parent / "images")[:8]
    outs = {}
    for batch_size in (1, 4):
        predictor = EnginePredictor(loaded, hf_engine, batch_size=batch_size, max_tokens=12)
        outs[batch_size] = tmp_path / f"batch{batch_size}"
        asyncio.run(evaluate(examples, predictor, outs[batch_size], progress=False))
    lines, summary = check_consistent(outs[4], 8)
    assert summary["config"]["predictor"] == "engine" and summary["config"]["batch_size"] == 4
    for line, example in zip(lines, examples):
        assert line["error"] is None and line["finish_reason"] in ("stop", "length")
        assert line["text"].startswith(example.expression)  # the grounding prompt is echoed
    unbatched, _ = read_outputs(outs[1])
    assert [line["text"] for line in unbatched] == [line["text"] for line in lines]  # batching costs nothing


def test_engine_predictor_echoes_punctuated_expressions_as_written(tmp_path, loaded, hf_engine):
    """The tiny tokenizer cleans up tokenization spaces by default, as the real one does; answers must not."""
    from eval.tables import load_table

    examples = load_table(FIXTURES / "qwen-vl" / "refcoco_testA.jsonl", FIXTURES / "images")
    examples += load_refer(FIXTURES / "refcocog" / "refs(umd).p", FIXTURES / "images")
    predictor = EnginePredictor(loaded, hf_engine, batch_size=4, max_tokens=4)
    asyncio.run(evaluate(examples, predictor, tmp_path / "out", progress=False))
    lines, _ = read_outputs(tmp_path / "out")
    punctuated = [line for line in lines if " ," in line["expression"] or " 's" in line["expression"]]
    assert len(punctuated) == 3
    for line in lines:
        assert line["text"].startswith(line["expression"])


def test_engine_predictor_from_the_command_line(synthetic, tmp_path, tiny_dir):
    out = tmp_path / "engine"
    args = ["run", "--annotations", str(synthetic), "--images", str(synthetic.parent / "images"), "--limit", "3"]
    args += ["--predictor", "engine", "--model", str(tiny_dir), "--device", "cpu", "--max-tokens", "8"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    _, summary = check_consistent(out, 3)
    assert summary["config"]["engine"] == "HFEngine" and summary["config"]["max_tokens"] == 8
    assert summary["dtype"] == summary["config"]["dtype"] == "float32"  # the official run's precision by default
    assert "Precision: float32" in (out / "report.md").read_text()
    assert build_parser().parse_args(["run", "--predictor", "engine", "--out", "x", "--jsonl", "f"]).dtype == "float32"


def test_a_smaller_run_in_the_same_folder_keeps_the_other_answers(synthetic, tmp_path):
    out = tmp_path / "out"
    args = ["run", "--annotations", str(synthetic), "--images", str(synthetic.parent / "images")]
    args += ["--predictor", "roundtrip", "--out", str(out), "--no-progress"]
    assert main([*args, "--limit", "10"]) == 0
    assert main([*args, "--limit", "4"]) == 0
    lines, summary = read_outputs(out)
    assert len(lines) == 10 and summary["n"] == 4 and summary["timing"]["predicted"] == 0


def test_a_rerun_scores_the_stored_answers_against_the_current_annotations(synthetic, tmp_path, capsys):
    data = json.loads(synthetic.read_text())
    annotations = tmp_path / "finetune_synth_val.json"
    annotations.write_text(json.dumps(data))
    out = tmp_path / "out"
    args = ["run", "--annotations", str(annotations), "--images", str(synthetic.parent / "images"), "--limit", "6"]
    args += ["--predictor", "roundtrip", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    first, summary = read_outputs(out)
    assert first[0]["correct"]
    x, y, w, h = data["annotations"][0]["bbox"]
    width, height = data["images"][0]["width"], data["images"][0]["height"]
    moved = [width - w, height - h, w, h] if x > width / 2 or y > height / 2 else [0, 0, w, h]
    moved = moved if moved != [x, y, w, h] else [x + w / 2, y, w / 2, h]
    data["annotations"][0]["bbox"] = moved  # the ground truth corrected after the answers were stored
    annotations.write_text(json.dumps(data))
    assert main(args) == 0
    lines, again = read_outputs(out)
    assert again["timing"]["predicted"] == 0 and lines[0]["entities"] == first[0]["entities"]
    assert lines[0]["gt_box"] == [moved[0], moved[1], moved[0] + moved[2], moved[1] + moved[3]]
    assert not lines[0]["correct"] and again["correct"] == summary["correct"] - 1
    check_consistent(out, 6)
    data["images"][1]["caption"] = "the question asked now"
    annotations.write_text(json.dumps(data))
    assert main(args) == 2
    assert "the annotations now ask 'the question asked now'" in capsys.readouterr().err


def test_splits_that_are_not_the_papers_stay_out_of_its_table(tmp_path, capsys):
    lmms = FIXTURES / "lmms-lab"
    out = tmp_path / "out"
    args = ["run", "--parquet", str(lmms / "RefCOCO/data/val-00000-of-00001.parquet")]
    args += [str(lmms / "RefCOCOplus/data/testA-00000-of-00001.parquet")]
    args += ["--refer", str(FIXTURES / "refcocog/refs(google).p"), "--images", str(FIXTURES / "images")]
    assert main([*args, "--predictor", "ceiling", "--out", str(out), "--no-progress"]) == 0
    assert "kept out of the paper's table: lmms-lab's RefCOCO val holds 8,811 rows" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    splits = {(s["dataset"], s["split"]): s for s in summary["per_split"]}
    assert set(splits) == {("refcoco", "val"), ("refcoco+", "testA"), ("refcocog-google", "val")}
    assert {k: s["paper_column"] for k, s in splits.items()} == {
        ("refcoco", "val"): False,
        ("refcoco+", "testA"): True,
        ("refcocog-google", "val"): False,
    }
    assert "3,811" in splits[("refcoco", "val")]["caveat"] and summary["caveats"] == [
        splits[("refcoco", "val")]["caveat"]
    ]
    assert splits[("refcocog-google", "val")]["partition"] == "google"
    assert splits[("refcoco+", "testA")]["sources"] == ["lmms-lab"] and summary["bbox_formats"] == ["xywh"]
    report = (out / "report.md").read_text()
    ours = next(line for line in report.splitlines() if line.startswith("| **this run**"))
    cells = [cell.strip() for cell in ours.split("|")[2:-1]]
    assert cells == ["–", "–", "–", "–", f"{100 * splits[('refcoco+', 'testA')]['accuracy']:.2f}", "–", "–", "–"]
    assert "| refcoco | val | unc | lmms-lab | xywh | no: lmms-lab's RefCOCO val holds 8,811 rows" in report
    assert "| refcocog-google | val | google | refer | xywh | no: the google partition, not the paper's |" in report

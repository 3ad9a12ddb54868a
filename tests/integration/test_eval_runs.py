"""End to end on a synthetic set: the oracle and whole-image predictors score their exact expected values, the
engine predictor runs the tiny model, and every output file agrees with the others."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from eval.__main__ import main
from eval.datasets import load_mdetr
from eval.predictors import EnginePredictor
from eval.runner import evaluate
from eval.synth import write_synthetic

N = 80


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


def expected_counts(annotation_file: Path) -> dict[str, int]:
    data = json.loads(annotation_file.read_text())
    oracle = whole = 0
    for entry, annotation in zip(data["images"], data["annotations"]):
        w, h = entry["width"], entry["height"]
        x, y, bw, bh = annotation["bbox"]
        gt = (x, y, x + bw, y + bh)
        box = grid_box(x / w, y / h, (x + bw) / w, (y + bh) / h)
        oracle += plain_iou((box[0] * w, box[1] * h, box[2] * w, box[3] * h), gt) >= 0.5
        whole += plain_iou((0, 0, w, h), gt) >= 0.5
    return {"oracle": oracle, "whole-image": whole}


def read_outputs(out: Path) -> tuple[list[dict], dict]:
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return lines, json.loads((out / "summary.json").read_text())


def check_consistent(out: Path, n: int) -> tuple[list[dict], dict]:
    """The files of one run agree: one line per expression, the summary their mean, the report and image made."""
    lines, summary = read_outputs(out)
    assert len(lines) == n == summary["n"] and len({line["id"] for line in lines}) == n
    assert summary["correct"] == sum(line["correct"] for line in lines)
    assert summary["accuracy"] == pytest.approx(summary["correct"] / n)
    assert summary["any_box_correct"] == sum(line["any_box_correct"] for line in lines)
    assert summary["no_box"] == sum(line["no_box"] for line in lines)
    assert sum(s["n"] for s in summary["per_split"]) == n
    for line in lines:
        assert line["correct"] == (line["iou"] >= 0.5) and line["any_box_iou"] >= line["iou"]
        assert line["no_box"] == (not line["pred_boxes"])
    assert summary["no_box"] == summary["phrase_mismatch"] + summary["no_object"]
    assert summary["no_object"] == sum(line["no_object"] for line in lines)
    assert summary["schema_version"] == 2 and summary["versions"]["python"]
    report = (out / "report.md").read_text()
    assert "52.32" in report and "56.3" in report and f"{100 * summary['accuracy']:.2f}%" in report
    assert (out / "examples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return lines, summary


@pytest.mark.parametrize("predictor", ["oracle", "whole-image"])
def test_reference_predictors_score_exactly(synthetic, tmp_path, predictor):
    out = tmp_path / predictor
    args = ["run", "--annotations", str(synthetic), "--images", str(synthetic.parent / "images")]
    assert main([*args, "--predictor", predictor, "--out", str(out), "--no-progress"]) == 0
    _, summary = check_consistent(out, N)
    assert summary["correct"] == expected_counts(synthetic)[predictor]
    assert summary["no_box"] == 0 and summary["errors"] == 0 and summary["complete"]
    assert summary["per_split"][0]["dataset"] == "synth" and summary["per_split"][0]["split"] == "val"


def test_oracle_is_below_perfect_and_whole_image_near_zero(synthetic):
    counts = expected_counts(synthetic)
    assert 0.7 * N < counts["oracle"] < N  # small shapes lose to the grid: the ceiling is real
    assert counts["whole-image"] < 0.1 * N


def test_per_split_reporting_limit_and_missing_images(tmp_path, capsys):
    val = write_synthetic(tmp_path / "set", n=5, seed=3, split="val")
    test_a = write_synthetic(tmp_path / "set", n=4, seed=4, split="testA")
    args = ["run", "--annotations", str(val), str(test_a), "--predictor", "oracle", "--no-progress"]
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


def test_engine_predictor_from_the_command_line(synthetic, tmp_path, tiny_dir):
    out = tmp_path / "engine"
    args = ["run", "--annotations", str(synthetic), "--images", str(synthetic.parent / "images"), "--limit", "3"]
    args += ["--predictor", "engine", "--model", str(tiny_dir), "--device", "cpu", "--max-tokens", "8"]
    assert main([*args, "--out", str(out), "--no-progress"]) == 0
    _, summary = check_consistent(out, 3)
    assert summary["config"]["engine"] == "HFEngine" and summary["config"]["max_tokens"] == 8


def test_a_smaller_run_in_the_same_folder_keeps_the_other_answers(synthetic, tmp_path):
    out = tmp_path / "out"
    args = ["run", "--annotations", str(synthetic), "--images", str(synthetic.parent / "images")]
    args += ["--predictor", "oracle", "--out", str(out), "--no-progress"]
    assert main([*args, "--limit", "10"]) == 0
    assert main([*args, "--limit", "4"]) == 0
    lines, summary = read_outputs(out)
    assert len(lines) == 10 and summary["n"] == 4 and summary["timing"]["predicted"] == 0

"""The api predictor against the real Serve application with the tiny model: a short run writes files that
agree with one another, and a second run into the same folder asks the service nothing."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from eval.__main__ import main
from eval.synth import write_synthetic
from serve.app.client import KosmosClient
from tests.helpers import check_consistent

pytestmark = pytest.mark.slow

N = 12

FIELDS = {
    "id", "dataset", "split", "expression", "image", "image_id", "width", "height", "gt_box", "predictor", "text",
    "entities", "finish_reason", "error", "pred_boxes", "iou", "correct", "any_box_iou", "any_box_correct",
    "no_box", "phrase_mismatch", "no_object",
}  # fmt: skip
"""Every line of ``predictions.jsonl`` has exactly these."""


@pytest.fixture
def asked(monkeypatch) -> Counter[str]:
    """Counts the completions the runner asks of the service, by expression."""
    counts: Counter[str] = Counter()
    complete = KosmosClient.complete

    async def counting(self, image, **kwargs):
        counts[kwargs["text"]] += 1
        return await complete(self, image, **kwargs)

    monkeypatch.setattr(KosmosClient, "complete", counting)
    return counts


def test_api_run_against_the_service_then_resume(service_url, asked, tmp_path):
    synthetic = write_synthetic(tmp_path / "synth", n=N, seed=5)
    out = tmp_path / "api"
    args = ["run", "--annotations", str(synthetic), "--images", str(synthetic.parent / "images")]
    args += ["--predictor", "api", "--url", service_url, "--concurrency", "4", "--out", str(out), "--no-progress"]

    assert main(args) == 0
    lines, summary = check_consistent(out, N)
    assert sum(asked.values()) == N
    assert summary["errors"] == 0 and summary["complete"] and summary["timing"]["predicted"] == N
    assert summary["accuracy"] == pytest.approx(sum(line["correct"] for line in lines) / N)
    assert summary["config"]["served_model"] and summary["config"]["retries"] == 0
    for line in lines:
        assert set(line) == FIELDS and line["error"] is None and line["finish_reason"] in ("stop", "length")
        assert line["text"].startswith(line["expression"])  # the clean content, which echoes the grounding phrase
        assert all(set(entity) == {"phrase", "span", "boxes", "boxes_px"} for entity in line["entities"])

    predictions = (out / "predictions.jsonl").read_bytes()
    asked.clear()
    assert main(args) == 0
    assert sum(asked.values()) == 0
    assert (out / "predictions.jsonl").read_bytes() == predictions
    again = json.loads((out / "summary.json").read_text())
    assert again["timing"]["predicted"] == 0
    assert {k: again[k] for k in ("n", "correct", "no_box", "errors")} == {
        k: summary[k] for k in ("n", "correct", "no_box", "errors")
    }

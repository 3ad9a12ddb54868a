"""The engine-only and preprocessing modes on the tiny model: their files, and numbers consistent with them.

The loops' figures depend on how fast this machine runs the tiny model, so here they are checked only for what
holds at any speed; ``test_engine_loops`` checks their values on a simulated engine and clock."""

from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image

from bench.__main__ import main
from bench.engine_bench import engine_requests
from bench.metrics import BatchRecord
from bench.preprocess_bench import pixel_deviation
from bench.records import read_json, read_jsonl
from bench.workload import WorkloadConfig, build_workload
from serve.engine.build import build_engine
from serve.engine.config import EngineConfig

ITERATIONS = 2
BATCH_SIZES = (1, 3)
LIGHT, FLOOD = 4.0, 5000.0
"""Open-loop rates: one the tiny engine sustains, one it cannot."""
WORKLOAD = ["--resolutions", "64x48", "--pool-size", "5", "--max-tokens", "6", "--seed", "2"]


@pytest.fixture(scope="module")
def engine_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("engine")
    args = ["engine", "--model", str(tiny_dir), "--out", str(out), "--engine", "hf,fast", "--batch-sizes", "1,3"]
    args += ["--iterations", str(ITERATIONS), "--concurrency", "2,5", "--rates", f"{LIGHT},{FLOOD}", "--duration", "1"]
    assert main([*args, "--device", "cpu", "--nodes", "g5.xlarge", "--no-progress", *WORKLOAD]) == 0
    return out


def test_engine_mode_writes_its_files(engine_run):
    summary = read_json(engine_run / "summary.json")
    assert summary["schema_version"] == 1 and summary["kind"] == "engine"
    assert summary["gpu"] == "cpu" and summary["dtype"] == "float32"
    assert summary["versions"]["torch"] and "git_commit" in summary and summary["hardware"]["cpu_cores"] >= 1
    assert summary["config"]["workload"]["max_tokens"] == 6
    points = summary["points"]
    assert [(p["path"], p["batch_size"]) for p in points] == [(e, b) for e in ("hf", "fast") for b in BATCH_SIZES]
    assert {p["max_tokens"] for p in points} == {6}
    batches = [BatchRecord(**row) for row in read_jsonl(engine_run / "batches.jsonl")]
    assert len(batches) == ITERATIONS * len(points)
    for point in points:
        mine = [b for b in batches if (b.path, b.batch_size) == (point["path"], point["batch_size"])]
        seconds = sum(b.seconds for b in mine)
        assert point["iterations"] == ITERATIONS and point["images"] == ITERATIONS * point["batch_size"]
        assert point["images_per_s"] == pytest.approx(point["images"] / seconds)
        assert point["latency_s"] == pytest.approx(seconds / ITERATIONS)
        assert point["tokens_per_s"] == pytest.approx(sum(b.completion_tokens for b in mine) / seconds)
        assert 1 <= point["completion_tokens_mean"] <= 7  # six new tokens at most, plus the end token
        assert point["cost_per_1k_images_usd"] == pytest.approx(1.006 / (point["images_per_s"] * 3.6))
    with open(engine_run / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(r["images_per_s"]) for r in rows] == pytest.approx([p["images_per_s"] for p in points])
    report = (engine_run / "report.md").read_text()
    assert "| fast | 6 | 3 |" in report and "| hf | 6 | 1 |" in report
    with Image.open(engine_run / "engine_throughput.png") as image:
        assert image.size[0] > 500


def check_loop_figures(point: dict) -> None:
    """What a loop's figures satisfy at any speed: rates from the same requests, ordered latencies, at most six
    new tokens and the end token a request."""
    assert point["requests"] >= 0 and point["steps_per_s"] >= 0
    if point["requests"]:
        assert point["images_per_s"] > 0 and 1 <= point["tokens_per_s"] / point["images_per_s"] <= 7
        assert 0 < point["latency_p50_s"] <= point["latency_p99_s"]
    else:
        assert point["images_per_s"] == point["tokens_per_s"] == 0 and point["latency_p50_s"] is None


def test_closed_loops_keep_their_requests_in_the_engine(engine_run):
    """The fast engine never runs more sequences than it keeps nor than its three slots (the largest batch
    size); hf's steps run whole batches, so it reports none running between them."""
    points = read_json(engine_run / "summary.json")["continuous"]
    assert [(p["path"], p["concurrency"], p["max_tokens"]) for p in points] == [
        (e, c, 6) for e in ("hf", "fast") for c in (2, 5)
    ]
    for point in points:
        check_loop_figures(point)
        assert point["steps_per_s"] > 0  # the timed window takes at least one step
        assert 0 <= point["mean_batch"] <= min(point["concurrency"], max(BATCH_SIZES))
        if point["path"] == "hf":
            assert point["mean_batch"] == 0
    assert "## Closed loops at the engine" in (engine_run / "report.md").read_text()


def test_open_loops_report_what_finished_and_what_waited(engine_run):
    points = read_json(engine_run / "summary.json")["open"]
    assert [(p["path"], p["rate"]) for p in points] == [(e, r) for e in ("hf", "fast") for r in (LIGHT, FLOOD)]
    for point in points:
        check_loop_figures(point)
        assert isinstance(point["waiting_at_end"], int) and point["waiting_at_end"] >= 0
        assert point["mean_batch"] <= max(BATCH_SIZES)
    assert "## Open loops at the engine" in (engine_run / "report.md").read_text()


def test_output_lengths_measure_each_length_in_turn(tiny_dir, tmp_path):
    """Every batch size at each exact output length, the closed loop too; each point says its length."""
    out = tmp_path / "lengths"
    args = ["engine", "--model", str(tiny_dir), "--out", str(out), "--engine", "fast", "--batch-sizes", "1,2"]
    args += ["--iterations", "1", "--output-lengths", "3,5", "--concurrency", "2", "--duration", "0.2"]
    assert main([*args, "--device", "cpu", "--no-progress", *WORKLOAD]) == 0
    summary = read_json(out / "summary.json")
    assert summary["config"]["output_lengths"] == [3, 5]
    points = summary["points"]
    assert [(p["max_tokens"], p["batch_size"]) for p in points] == [(3, 1), (3, 2), (5, 1), (5, 2)]
    for point in points:
        assert point["completion_tokens_mean"] == point["max_tokens"] and point["finished_by_length_fraction"] == 1
    batches = [BatchRecord(**row) for row in read_jsonl(out / "batches.jsonl")]
    assert [(b.max_tokens, b.batch_size, b.completion_tokens) for b in batches] == [
        (3, 1, 3),
        (3, 2, 6),
        (5, 1, 5),
        (5, 2, 10),
    ]
    loops = summary["continuous"]
    assert [(p["max_tokens"], p["concurrency"]) for p in loops] == [(3, 2), (5, 2)]
    for point in loops:
        check_loop_figures(point)
        if point["requests"]:
            assert point["tokens_per_s"] == pytest.approx(point["max_tokens"] * point["images_per_s"])
    report = (out / "report.md").read_text()
    assert "exactly 3, 5 new tokens in turn" in report and "| fast | 5 | 2 |" in report


def test_both_paths_ran_the_same_requests(engine_run, loaded):
    """Greedy tokens of the two paths agree, so equal token counts show they ran the same batches; and the
    counts are those the engine gives for the workload's first requests."""
    batches = [BatchRecord(**row) for row in read_jsonl(engine_run / "batches.jsonl")]
    by_path = {
        path: [(b.batch_size, b.completion_tokens) for b in batches if b.path == path] for path in ("hf", "fast")
    }
    assert by_path["hf"] == by_path["fast"]
    config = WorkloadConfig(resolutions={"64x48": 1.0}, pool_size=5, max_tokens=6, seed=2)
    requests = engine_requests(loaded, build_workload(config))
    engine = build_engine(loaded, EngineConfig(kind="hf", max_batch_size=3, batch_wait_s=0.0))
    # Batch size 3, after one warm-up batch: the timed batches hold requests 3, 4, 0 and then 1, 2, 3.
    expected = [
        sum(r.completion_tokens for r in engine.generate([requests[i % 5] for i in range(s, s + 3)])) for s in (3, 6)
    ]
    assert [tokens for size, tokens in by_path["hf"] if size == 3] == expected


def test_ignore_eos_forces_the_token_count(tiny_dir, tmp_path):
    out = tmp_path / "forced"
    args = ["engine", "--model", str(tiny_dir), "--out", str(out), "--batch-sizes", "4", "--iterations", "1"]
    assert main([*args, "--device", "cpu", *WORKLOAD, "--ignore-eos"]) == 0
    [point] = read_json(out / "summary.json")["points"]
    assert point["completion_tokens_mean"] == 6 and point["finished_by_length_fraction"] == 1.0
    assert "exactly 6 new tokens" in (out / "report.md").read_text()


def test_preprocess_mode_writes_its_summary(tiny_dir, tmp_path):
    out = tmp_path / "pre"
    args = ["preprocess", "--out", str(out), "--model", str(tiny_dir), "--images", "3", "--duration", "0.1"]
    args.append("--no-progress")
    assert main(args) == 0
    summary = read_json(out / "summary.json")
    assert summary["schema_version"] == 1 and summary["kind"] == "preprocess"
    assert summary["config"]["resolution"] == "640x480" and summary["config"]["images"] == 3
    assert summary["config"]["duration_s"] == 0.1
    paths = summary["paths"]
    assert list(paths) == ["hf", "ours_exact", "ours_fast"]
    for values in paths.values():
        assert values["images"] % 3 == 0 and values["images"] >= 3
        assert values["images_per_s_per_core"] == pytest.approx(values["images"] / values["seconds"])
        ratio = values["images_per_s_per_core"] / paths["hf"]["images_per_s_per_core"]
        assert values["speedup_vs_hf"] == pytest.approx(ratio)
    assert paths["hf"]["speedup_vs_hf"] == 1.0
    fast = paths["ours_fast"]
    assert 0 < fast["pixel_mean_abs_diff"] <= fast["pixel_max_abs_diff"] <= 255  # half-scale decode: not identical
    assert fast["pixel_mean_abs_diff"] < 5  # but close: a few levels at most on average
    assert "pixel_mean_abs_diff" not in paths["ours_exact"]
    report = (out / "report.md").read_text()
    assert (
        "| ours_exact |" in report and "| ours_fast |" in report and "| mean abs. diff. vs exact (levels) |" in report
    )


def test_pixel_deviation_is_zero_for_the_same_pixels_and_exact_otherwise():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (4, 5, 3), dtype=np.uint8) for _ in range(3)]
    assert pixel_deviation(images, images) == {"pixel_mean_abs_diff": 0.0, "pixel_max_abs_diff": 0.0}
    shifted = [np.clip(x.astype(int) + 3, 0, 255).astype(np.uint8) for x in images]
    expected = np.concatenate([np.abs(s.astype(int) - x).ravel() for s, x in zip(shifted, images)])
    deviation = pixel_deviation(images, shifted)
    assert deviation["pixel_mean_abs_diff"] == pytest.approx(expected.mean())
    assert deviation["pixel_max_abs_diff"] == 3.0


def test_profile_times_the_phases_and_lists_the_top_operators(tiny_dir, tmp_path):
    from bench.lab import engine_profile

    out = tmp_path / "profile.json"
    args = ["--model", str(tiny_dir), "--batch-sizes", "1,3", "--tokens", "6", "--decode-attention", "sdpa"]
    engine_profile.main([*args, "--compile", "off", "--kernels", "4", "--timeline", "--out", str(out)])
    result = read_json(out)
    assert result["gpu"] == "cpu" and [p["batch_size"] for p in result["points"]] == [1, 3]
    for point in result["points"]:
        assert point["compiled"] is False and point["decode_attention"] == "sdpa"
        assert point["decode_steps"] == 4  # six tokens: the admission step gives two, four decode steps the rest
        # each phase timed on its own: on two busy cores the vision alone can take as long as the admission
        assert point["vision_s"] > 0 and point["admission_step_s"] > 0 and point["decode_step_s"] > 0
        assert point["total_s"] > point["admission_step_s"]
        assert point["images_per_s"] == pytest.approx(point["batch_size"] / point["total_s"])
    (table,) = result["kernels"]
    assert table["batch_size"] == 3 and table["clock"].startswith("cpu")
    for phase in ("admission_step", "decode_step"):
        spent = [row["ms"] for row in table[phase]]
        assert len(spent) == 4 and spent == sorted(spent, reverse=True) and sum(spent) <= table[f"{phase}_ms"]
    timeline = result["timeline"]  # on the CPU no device work is traced: the whole batch is one idle stretch
    assert timeline["batch_size"] == 3 and timeline["wall_ms"] > 0 and timeline["device_busy_ms"] == 0
    (gap,) = timeline["longest_gaps"]
    assert gap == {"ms": pytest.approx(timeline["wall_ms"]), "at_ms": 0, "after": "(start)", "before": "(end)"}


def test_device_gaps_count_overlaps_once_and_rank_the_idle_stretches():
    from bench.lab.engine_profile import MARK, device_gaps

    def event(name, cat, ts, dur):
        return {"name": name, "cat": cat, "ph": "X", "ts": ts, "dur": dur}

    events = [
        event(MARK, "user_annotation", 1000, 100),
        event("before the range", "kernel", 900, 50),
        event("a", "kernel", 1010, 20),  # idle 10 before it
        event("copy", "gpu_memcpy", 1020, 30),  # overlaps a: busy to 1050
        event("cpu op", "cpu_op", 1050, 40),  # the host's: not device work
        event("b", "kernel", 1080, 5),  # idle 30 after the copy
        event("c", "gpu_memset", 1085, 5),
    ]
    assert device_gaps(events, top=2) == {
        "wall_ms": 0.1,
        "device_busy_ms": 0.05,
        "device_idle_ms": 0.05,
        "device_ops": 4,
        "idle_gaps": 3,
        "longest_gaps": [
            {"ms": 0.03, "at_ms": 0.05, "after": "copy", "before": "b"},
            {"ms": 0.01, "at_ms": 0.09, "after": "c", "before": "(end)"},
        ],
    }

"""The load generator against the real tiny service (``service_url``): one short closed-loop run through the
command line, and every file it writes consistent with the others and with the service's answers."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from bench.__main__ import main
from bench.metrics import percentile
from bench.records import read_json, read_jsonl, read_requests

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
POINTS = ["concurrency=1", "concurrency=2"]


@pytest.fixture(scope="module")
def run_dir(service_url, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "run"
    args = f"run --url {service_url} --out {out} --concurrency 1,2 --duration 3 --warmup 0.5 --grace 20"
    args += f" --resolutions 320x240:3,640x480:1 --pool-size 8 --max-tokens {MAX_TOKENS} --seed 1"
    args += " --nodes m7g.large --slo-p99 30 --no-progress"
    assert main(args.split()) == 0
    return out


def test_every_file_is_written(run_dir):
    names = {"summary.json", "summary.csv", "report.md", "requests.jsonl", "replicas.jsonl"}
    plots = {"throughput_latency.png", "latency_cdf.png", "timeseries.png", "cost_vs_latency.png"}
    assert names | plots <= {p.name for p in run_dir.iterdir()}
    for name in plots:
        with Image.open(run_dir / name) as image:
            assert image.size[0] > 500 and image.size[1] > 300
    assert read_jsonl(run_dir / "replicas.jsonl") == []  # no --serve-api


def test_summary_matches_the_request_records(run_dir, service_url):
    summary = read_json(run_dir / "summary.json")
    assert summary["schema_version"] == 1 and summary["kind"] == "service"
    assert summary["config"]["url"] == service_url and summary["nodes"] == ["m7g.large"]
    records = read_requests(run_dir / "requests.jsonl")
    points = summary["points"]
    assert [p["label"] for p in points] == POINTS
    assert len(records) == sum(p["sent"] for p in points)
    for point in points:
        mine = [r for r in records if r.point == point["index"]]
        steady = [r for r in mine if not r.warmup]
        assert len(mine) == point["sent"] and point["requests"] == len(steady) > 0
        assert point["errors"] == point["timeouts"] == point["incomplete"] == 0, [r.error for r in mine if r.error]
        assert point["ok"] == len(steady)
        ended = [r for r in mine if r.ok and point["window_start_s"] <= r.end_s < point["window_end_s"]]
        window = point["window_end_s"] - point["window_start_s"]
        assert window == pytest.approx(3.0)
        assert point["images_per_s"] == pytest.approx(len(ended) / window) and point["images_per_s"] > 0
        latencies = [r.latency_s for r in steady]
        assert point["latency_p50_s"] == percentile(latencies, 50)
        assert point["latency_p99_s"] == percentile(latencies, 99) <= point["latency_max_s"] == max(latencies)
        assert point["output_tokens_per_s"] == pytest.approx(sum(r.completion_tokens for r in ended) / window)
        assert point["cost_per_1k_images_usd"] == pytest.approx(
            summary["usd_per_hour"] / (point["images_per_s"] * 3600) * 1000
        )
        assert point["slo_met"] is True and point["goodput_images_per_s"] == point["images_per_s"]


def test_records_carry_the_services_answers(run_dir):
    records = read_requests(run_dir / "requests.jsonl")
    assert {r.status for r in records} == {200}
    assert all(1 <= r.completion_tokens <= MAX_TOKENS for r in records)
    assert all(r.prompt_tokens > 64 for r in records)  # the 64 image slots and the task's prompt
    assert {(r.image_width, r.image_height) for r in records} <= {(320, 240), (640, 480)}
    in_flight = max(
        sum(o.start_s <= r.start_s < o.end_s for o in records if o.point == r.point) for r in records if r.point == 1
    )
    assert in_flight == 2  # concurrency=2 kept two requests in flight


def test_csv_and_report_repeat_the_summary(run_dir):
    points = read_json(run_dir / "summary.json")["points"]
    with (run_dir / "summary.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [row["label"] for row in rows] == POINTS
    for row, point in zip(rows, points):
        assert float(row["images_per_s"]) == pytest.approx(point["images_per_s"])
        assert float(row["latency_p99_s"]) == pytest.approx(point["latency_p99_s"])
        assert int(row["requests"]) == point["requests"]
    report = (run_dir / "report.md").read_text()
    for point in points:
        assert f"| {point['label']} | {point['images_per_s']:.4g} |" in report
    assert "m7g.large" in report and "![throughput and p99 latency](throughput_latency.png)" in report


@pytest.fixture(scope="module")
def streamed_dir(service_url, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "streamed"
    args = f"run --url {service_url} --out {out} --concurrency 2 --duration 3 --warmup 0.5 --grace 20 --stream"
    args += f" --resolutions 320x240 --pool-size 4 --max-tokens {MAX_TOKENS} --seed 1 --percentiles 50,90,99"
    assert main([*args.split(), "--no-progress", "--goodput", "ttft:60000", "tpot:60000", "e2el:60000"]) == 0
    return out


def test_a_streamed_run_reports_the_latencies_of_vllm_bench_serve(streamed_dir):
    """TTFT, TPOT, ITL and E2EL with mean, median, std and the percentiles asked for, from the service's own
    stream, and goodput under three SLOs at once (generous ones: every request meets them)."""
    [point] = read_json(streamed_dir / "summary.json")["points"]
    answered = [r for r in read_requests(streamed_dir / "requests.jsonl") if r.ok and not r.warmup]
    records = [r for r in answered if r.chunk_times_s]  # the tiny model's answers may be empty: no text chunk
    assert records and all(r.first_token_s == r.chunk_times_s[0] for r in records)
    for metric in ("ttft", "tpot", "itl", "e2el"):
        stats = [point[f"{s}_{metric}_ms"] for s in ("mean", "median", "std", "p50", "p90", "p99")]
        assert None not in stats, metric
        assert 0 <= point[f"p50_{metric}_ms"] <= point[f"p90_{metric}_ms"] <= point[f"p99_{metric}_ms"]
    assert point["median_e2el_ms"] == pytest.approx(1000 * percentile([r.latency_s for r in answered], 50))
    ttft = [1000 * (r.first_token_s - r.start_s) for r in records]
    assert point["p99_ttft_ms"] == pytest.approx(percentile(ttft, 99), rel=1e-6)
    assert point["mean_ttft_ms"] <= point["mean_e2el_ms"]
    assert point["goodput_slos_ms"] == {"ttft": 60000, "tpot": 60000, "e2el": 60000}
    assert point["request_goodput"] == pytest.approx(point["images_per_s"])
    [result] = read_jsonl(streamed_dir / "vllm_bench_serve.jsonl")
    assert result["completed"] == round(point["images_per_s"] * point["window_s"]) > 0
    assert result["request_goodput"] == point["request_goodput"] and result["p99_itl_ms"] == point["p99_itl_ms"]
    report = (streamed_dir / "report.md").read_text()
    assert "## Latency (ms)" in report and "| concurrency=2 | ITL |" in report and "## Goodput:" in report

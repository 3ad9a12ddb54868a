"""Summaries, reports and the pricing estimate, from synthetic runs whose numbers are known."""

from __future__ import annotations

import csv

import pytest
from PIL import Image

from bench.__main__ import main
from bench.cost import load_prices, parse_nodes
from bench.generator import PointResult
from bench.load import LoadRun
from bench.records import RequestRecord, write_json, write_jsonl
from bench.replicas import ReplicaSample
from bench.report import write_run_report
from bench.summary import service_summary


def point(index: int, concurrency: int, start: float) -> PointResult:
    return PointResult(
        index=index,
        label=f"concurrency={concurrency}",
        mode="closed",
        concurrency=concurrency,
        rate=None,
        x=float(concurrency),
        start_s=start,
        window_start_s=start,
        window_end_s=start + 10.0,
        end_s=start + 11.0,
        sent=0,
        skipped=0,
        schedule=[],
    )


def synthetic_run(latency: float, per_second: int) -> LoadRun:
    """Two points of 10 s; the first sends `per_second` requests a second of `latency` s, the second twice as
    many at twice the latency, one in ten refused with a 429."""
    points, records = [point(0, 2, 0.0), point(1, 4, 20.0)], []
    for p, (rate, lat) in zip(points, [(per_second, latency), (2 * per_second, 2 * latency)]):
        for i in range(10 * rate):
            start = p.start_s + i / rate
            refused = i % 10 == 9
            records.append(
                RequestRecord(
                    point=p.index,
                    index=i,
                    item=i % 4,
                    task="caption",
                    image_width=640,
                    image_height=480,
                    image_bytes=40_000,
                    warmup=False,
                    scheduled_s=start,
                    start_s=start,
                    end_s=start + (0.01 if refused else lat),
                    status=429 if refused else 200,
                    prompt_tokens=70,
                    completion_tokens=0 if refused else 12,
                    error_type="rate_limit_error" if refused else None,
                )
            )
        p.sent = 10 * rate
    replicas = [ReplicaSample(float(t), "kosmos", "Generator", "HEALTHY", 1 + t // 15, 1 + t // 15) for t in range(31)]
    return LoadRun("2026-01-01T00:00:00+00:00", points, records, replicas)


def write_run(folder, run: LoadRun, nodes: str) -> dict:
    prices = load_prices()
    config = {"url": "http://127.0.0.1:8000", "workload": {"max_tokens": 12}, "load": {}, "slo_p99_s": 1.0}
    summary = service_summary(run, config, prices, parse_nodes(nodes), utilization=0.5, slo_p99_s=1.0)
    folder.mkdir(parents=True)
    write_jsonl(folder / "requests.jsonl", run.records)
    write_jsonl(folder / "replicas.jsonl", run.replicas)
    write_json(folder / "summary.json", summary)
    return summary


def test_summary_of_a_known_run(tmp_path):
    summary = write_run(tmp_path / "a10", synthetic_run(latency=0.4, per_second=5), "g5.xlarge")
    first, second = summary["points"]
    # Point 1: 50 requests in 10 s, 45 succeed; 44 of them end inside the window (i = 48 ends at 10 s exactly).
    assert (first["requests"], first["ok"], first["errors"], first["errors_by_status"]) == (50, 45, 5, {"429": 5})
    assert first["images_per_s"] == pytest.approx(4.4)
    assert first["output_tokens_per_s"] == pytest.approx(4.4 * 12)
    assert first["latency_p50_s"] == pytest.approx(0.4) and first["latency_p99_s"] == pytest.approx(0.4)
    assert first["cost_per_1k_images_usd"] == pytest.approx(1.006 / (4.4 * 3.6))
    assert first["cost_per_1k_images_usd_at_utilization"] == pytest.approx(2 * 1.006 / (4.4 * 3.6))
    assert first["slo_met"] is True and first["goodput_images_per_s"] == pytest.approx(4.4)
    # Point 2: 100 requests of 0.8 s; those sent at 9.3 s and after end past the window.
    assert second["requests"] == 100 and second["latency_p99_s"] == pytest.approx(0.8)
    ended_in_window = sum(1 for i in range(100) if i % 10 != 9 and i / 10 + 0.8 < 10)
    assert second["images_per_s"] == pytest.approx(ended_in_window / 10)
    assert summary["nodes"] == ["g5.xlarge"] and summary["usd_per_hour"] == 1.006
    assert summary["reference_usd_per_1k_images"] == 0.626


def test_run_report_is_consistent_with_the_summary(tmp_path):
    folder = tmp_path / "a10"
    summary = write_run(folder, synthetic_run(latency=0.4, per_second=5), "g5.xlarge")
    report = write_run_report(folder).read_text()
    with open(folder / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["label"] for r in rows] == ["concurrency=2", "concurrency=4"]
    for row, p in zip(rows, summary["points"]):
        for column in ("images_per_s", "latency_p99_s", "cost_per_1k_images_usd", "errors_by_status.429"):
            value = p["errors_by_status"]["429"] if column == "errors_by_status.429" else p[column]
            assert float(row[column]) == pytest.approx(value)
    assert "| concurrency=2 | 4.4 |" in report
    cheapest = min(p["cost_per_1k_images_usd"] for p in summary["points"])
    assert f"${cheapest:.4g} per 1,000 images at 100% utilization" in report
    assert "reference price $0.626" in report and "HTTP 429" in report
    assert "The highest throughput meeting the SLO is" in report
    assert "## Replicas over time" in report
    assert "| 15 | kosmos/Generator | HEALTHY | 2 | 2 |" in report and "| 30 | kosmos/Generator" in report
    assert "| 14 | kosmos/Generator" not in report  # unchanged polls are left out
    for name in ("throughput_latency", "latency_cdf", "timeseries", "cost_vs_latency"):
        assert f"]({name}.png)" in report
        with Image.open(folder / f"{name}.png") as image:
            assert image.format == "PNG" and image.size[0] >= 800


def test_run_report_with_an_engine_baseline(tmp_path):
    folder = tmp_path / "run"
    summary = write_run(folder, synthetic_run(latency=0.4, per_second=5), "g5.xlarge")
    engine = tmp_path / "engine"
    engine.mkdir()
    engine_points = [
        {"path": "hf", "batch_size": 8, "images_per_s": 20.0, "latency_p99_s": 0.4},
        {"path": "hf", "batch_size": 32, "images_per_s": 40.0, "latency_p99_s": 0.8},
        {"path": "fast", "batch_size": 32, "images_per_s": 80.0, "latency_p99_s": 0.4},
    ]
    write_json(
        engine / "summary.json",
        {"config": {"workload": {"max_tokens": 12}}, "gpu": "NVIDIA H200", "points": engine_points},
    )
    report = write_run_report(folder, engine).read_text()
    peak = max(p["images_per_s"] for p in summary["points"])
    assert f"| hf | 32 | 40 | {peak:.4g} | {peak / 40:.4g} |" in report
    assert f"| fast | 32 | 80 | {peak:.4g} | {peak / 80:.4g} |" in report
    assert "max_tokens differs" not in report


def test_price_command_prices_runs_on_their_instances(tmp_path, capsys):
    """Two service runs priced on the node sets given, and an engine run at two output lengths priced on every
    H200 of the shipped table: every file written, the figures consistent with the runs and the prices."""
    write_run(tmp_path / "a10", synthetic_run(latency=0.4, per_second=5), "g5.xlarge")
    write_run(tmp_path / "h100", synthetic_run(latency=0.1, per_second=50), "p5.48xlarge/gpu")
    engine = tmp_path / "engine"
    engine.mkdir()
    points = [
        {"path": "fast", "batch_size": 256, "max_tokens": n, "images_per_s": r, "completion_tokens_mean": n}
        for n, r in ((16, 1200.0), (32, 960.0))
    ]
    loops = [{"path": "fast", "concurrency": 384, "max_tokens": 32, "images_per_s": 880.0, "tokens_per_s": 28160.0}]
    config = {"output_lengths": [16, 32], "workload": {"max_tokens": 32}}
    write_json(
        engine / "summary.json",
        {"kind": "engine", "gpu": "NVIDIA H200", "config": config, "points": points, "continuous": loops},
    )
    batch = {"label": "batch", "images_per_s": 700.0, "error_rate": 0.0, "cpu_ms_per_request": 20.0}
    batch["completion_tokens_mean"] = 21.5
    (tmp_path / "batch").mkdir()
    write_json(
        tmp_path / "batch" / "summary.json",
        {"kind": "batch", "hardware": {"gpus": ["NVIDIA H200"]}, "config": {}, "points": [batch]},
    )
    out = tmp_path / "pricing"
    args = ["price", *(str(tmp_path / d) for d in ("a10", "h100", "engine", "batch")), "--out", str(out)]
    args += ["--margin", "0.4", "--utilization", "0.5,1", "--max-error-rate", "0.2", "--slo-p99", "1.0"]
    args += ["--nodes", f"{tmp_path / 'a10'}=g5.xlarge", "--nodes", f"{tmp_path / 'h100'}=p5.48xlarge/gpu"]
    assert main([*args, "--cpu-ms-per-request", "10"]) == 0
    with open(out / "pricing.csv") as handle:
        rows = list(csv.DictReader(handle))
    a10 = next(r for r in rows if r["figure_run"] == "a10")
    # a10: the second point (0.8 s p99, within the SLO) is faster: 83 successes end in its 10 s window.
    assert a10["figure_point"] == "concurrency=4" and float(a10["figure_images_per_s"]) == pytest.approx(8.3)
    assert float(a10["cost_per_1k_usd_at_100pct"]) == pytest.approx(1.006 / (8.3 * 3.6))
    assert float(a10["cost_per_1k_usd_at_50pct"]) == pytest.approx(2 * 1.006 / (8.3 * 3.6))
    assert float(a10["list_price_per_1k_usd_at_50pct"]) == pytest.approx(2 * 1.006 / (8.3 * 3.6) / 0.6)
    assert float(a10["break_even_usd_per_gpu_hour_at_100pct"]) == pytest.approx(0.626 * 8.3 * 3.6)
    h100 = next(r for r in rows if r["figure_run"] == "h100")
    assert h100["offer_name"] == "p5.48xlarge/gpu" and float(h100["usd_per_hour"]) == pytest.approx(55.04 / 8)
    shipped = load_prices()
    h200 = [p for p in shipped.gpu_rows() if p.accelerator == "H200"]
    engine_rows = [r for r in rows if r["figure_run"] == "engine"]
    assert len(engine_rows) == 3 * len(h200)  # two static lengths and one loop, on every H200 offer
    for row in engine_rows:
        price = shipped.price(row["offer_name"])
        assert float(row["usd_per_hour"]) == pytest.approx(price.gpu_usd_per_hour)
        assert row["offer_source"] == price.source and row["offer_date"].startswith(price.date)
        assert float(row["cpu_usd_per_hour"]) == 0  # the engine alone: no CPU tier
    batch_rows = [r for r in rows if r["figure_run"] == "batch"]
    assert len(batch_rows) == len(h200)
    for row in batch_rows:  # 14 cores beside each GPU (20 ms x 700 images/s): its own CPU, not the flag's 10 ms
        assert row["figure_kind"] == "batch" and float(row["cpu_cores_needed"]) == pytest.approx(14.0)
    report = (out / "report.md").read_text()
    assert "## Batch: cost per 1,000 images" in report and "## The CPU tier of the batch" in report
    assert "$0.626 per 1,000 images" in report and "2026-11" in report and "set at launch" in report
    assert "## Service: cost per 1,000 images" in report
    assert "## Engine only, static batch: cost per 1,000 images" in report and "not the service" in report
    assert "Output lengths measured: 16, 32 new tokens" in report and "p99 within 1 s" in report
    for price in h200:
        assert price.source in report and price.date in report
    assert "| detailed_caption | not measured |" in report
    with open(out / "tasks.csv") as handle:
        tasks = list(csv.DictReader(handle))
    caption = next(
        t
        for t in tasks
        if (t["task"], t["kind"], t["offer"], t["utilization"])
        == ("caption", "engine only, static batch", h200[0].name, "1.0")
    )
    cost_at = {n: h200[0].gpu_usd_per_hour / (r * 3.6) for n, r in ((16, 1200.0), (32, 960.0))}
    assert float(caption["cost_per_1k_usd"]) == pytest.approx(0.3 * cost_at[16] + 0.7 * cost_at[32])
    assert caption["every_length_measured"] == "True"
    for name in ("pricing", "break_even"):
        with Image.open(out / f"{name}.png") as image:
            assert image.format == "PNG" and image.size[0] > 800
    assert "a10 (service, - tokens) on g5.xlarge" in capsys.readouterr().out


def test_price_command_needs_a_price_for_the_gpu(tmp_path, capsys):
    write_run(tmp_path / "x", synthetic_run(latency=0.4, per_second=5), "g5.xlarge")
    args = ["price", str(tmp_path / "x"), "--out", str(tmp_path / "p"), "--max-error-rate", "0.2"]
    assert main(args) == 2
    assert "no price for its GPU" in (err := capsys.readouterr().err) and "--nodes" in err
    assert main([*args[:-2]]) == 2  # one refusal in ten is over the default error rate
    assert "no point to price" in capsys.readouterr().err
    assert main([*args, "--utilization", "0,1"]) == 2
    assert "fractions in (0, 1]" in capsys.readouterr().err


def test_a_batch_run_is_reported_and_priced_on_the_nodes_given(tmp_path, capsys):
    point = {"requests": 1010, "answered": 1000, "errors": 10, "images_per_s": 50.0, "wall_images_per_s": 40.0}
    memory = {"driver_rss_mib": 700.0, "tree_pss_mib": 4000.0, "processes": 20}
    job = {"source": "requests.jsonl", "output": "results.jsonl", "images": False}
    summary = {"kind": "batch", "config": {"job": job}, "started_at": "2026-12-06T10:00:00+0000"}
    write_json(tmp_path / "summary.json", {**summary, "points": [point], "memory_peak": memory})
    assert main(["report", str(tmp_path), "--nodes", "g5.xlarge", "--utilization", "0.5"]) == 0
    with open(tmp_path / "summary.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    assert float(row["cost_per_1k_images_usd"]) == pytest.approx(1.006 / (50 * 3.6))
    assert float(row["cost_per_1k_images_usd_at_utilization"]) == pytest.approx(2 * 1.006 / (50 * 3.6))
    report = (tmp_path / "report.md").read_text()
    assert "# Kosmos-2 batch run" in report and "| 1010 | 1000 | 10 |" in report and "`g5.xlarge`" in report
    assert "driver rss 700.0 MiB" in report and "over 20 processes" in report
    assert main(["report", str(tmp_path)]) == 0 and "Not priced" in (tmp_path / "report.md").read_text()

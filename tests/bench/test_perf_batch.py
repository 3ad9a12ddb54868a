"""The performance run's batch step: the table of the workload's images it feeds the batch mode, the command that
runs it, and the record's batch figures against the engine's and the service's."""

from __future__ import annotations

import json

import pandas as pd
from PIL import Image

from bench.lab.batch_input import batch_command, write_table
from bench.lab.perf_record import batch_record
from serve.__main__ import build_parser


def test_the_table_cycles_over_the_workloads_distinct_jpegs(tmp_path):
    table = write_table(tmp_path / "input", 150, 32)
    rows = pd.read_json(table, lines=True)
    assert len(rows) == 150 and rows["id"].is_unique
    pool = sorted((tmp_path / "input").glob("*.jpeg"))
    assert len(pool) == 64 and set(rows["image"]) == {p.name for p in pool}
    with Image.open(pool[0]) as image:
        assert (image.format, image.size) == ("JPEG", (640, 480))


def test_the_command_is_a_valid_batch_command_line_of_exact_lengths(tmp_path):
    command = batch_command(tmp_path, ["--model", "m", "--load-format", "dummy"], "configs/perf.yaml", 10, 32)
    args = build_parser().parse_args(command[3:])
    assert (args.command, args.task, args.max_tokens, args.ignore_eos) == ("batch", "caption", 32, True)
    assert args.summary == str(tmp_path / "batch" / "summary.json") and args.load_format == "dummy"


def test_the_record_sets_batch_beside_the_engine_and_the_service(tmp_path):
    (tmp_path / "batch").mkdir()
    point = {"images_per_s": 600.0, "requests": 1000, "cpu_ms_per_request": 9.0}
    summary = {"kind": "batch", "points": [point], "memory_peak": {"driver_rss_mib": 300.0}}
    (tmp_path / "batch" / "summary.json").write_text(json.dumps(summary))
    headline = {"engine_fast_images_per_s": 960.0, "service_images_per_s": 750.0}
    record = batch_record(tmp_path, headline)
    assert headline["batch_over_engine"] == 600 / 960 and headline["batch_over_service"] == 600 / 750
    assert record["batch"]["memory_peak"] == {"driver_rss_mib": 300.0} and record["batch"]["requests"] == 1000

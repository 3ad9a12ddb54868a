"""``python -m serve batch`` as a user runs it: its options checked before anything starts, a folder captioned by a
Ray of the command's own, the summary it writes, and a rerun with other options refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from serve.__main__ import main
from tests.helpers import encode, photo

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["-i", "r.jsonl", "-o", "o.jsonl", "--task", "vqa"], "--task goes with --images"),
        (["--images", "d", "-o", "o", "--rows-per-file", "0"], "take a positive number"),
        (["--images", "d", "-o", "o", "--region", "1,2"], "a region is four numbers"),
        (["-o", "o"], "one of the arguments -i/--input-file --images is required"),
    ],
)
def test_bad_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["batch", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.slow
def test_a_folder_is_captioned_and_a_rerun_with_other_options_refused(tiny_dir, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.png").write_bytes(encode(photo(64, 48, seed=1)))
    (folder / "sub" / "b.jpg").write_bytes(encode(photo(48, 64, seed=2), "JPEG"))
    (folder / "notes.txt").write_text("not an image: left out")
    output, summary = tmp_path / "captions", tmp_path / "run" / "summary.json"
    command = [sys.executable, "-m", "serve", "batch", "--model", str(tiny_dir), "--config", "configs/local.yaml"]
    command += ["--images", str(folder), "-o", str(output), "--max-tokens", "5", "--ignore-eos", "--no-progress"]
    done = subprocess.run(
        [*command, "--summary", str(summary), "--num-cpus", "2"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 rows this run (2 answers, 0 errors)" in done.stdout
    table = pd.read_parquet(output).set_index("id")
    assert sorted(table.index) == ["a.png", "sub/b.jpg"]
    assert (table["task"] == "caption").all() and (table["completion_tokens"] == 5).all()  # exactly, ignore_eos
    written = json.loads(summary.read_text())
    assert written["kind"] == "batch" and written["points"][0]["requests"] == 2
    assert written == json.loads((output / "_batch" / "summary.json").read_text())
    again = subprocess.run([*command, "--task", "detailed_caption"], cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 2 and "holds the state of a run with another options" in again.stderr

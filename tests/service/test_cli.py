"""The command line: a model that cannot be found stops ``run`` at once with one sentence, before Ray starts;
usage errors and failures exit apart; ``build`` writes a Serve config."""

from __future__ import annotations

import os
import subprocess
import sys

import yaml


def test_run_refuses_an_unreachable_model_in_one_sentence():
    result = subprocess.run(
        [sys.executable, "-m", "serve", "run", "--model", "microsoft/kosmos-2-unreachable"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "microsoft/kosmos-2-unreachable" in lines[0] and "python -m serve tiny" in lines[0]
    assert "Started a local Ray instance" not in result.stderr


def test_usage_errors_exit_2_and_failures_1(tmp_path):
    """A config file that does not check is a usage error (2), named in one line; ``build`` writes the Serve
    config of one that does."""
    broken = tmp_path / "broken.yaml"
    broken.write_text("engine: {max_batch_size: 0}\n")
    run = [sys.executable, "-m", "serve"]
    result = subprocess.run([*run, "run", "--config", str(broken)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "engine.max_batch_size" in result.stderr
    result = subprocess.run([*run, "build", "--config", str(tmp_path / "missing.yaml")], capture_output=True, text=True)
    assert result.returncode == 2 and "missing.yaml" in result.stderr
    built = tmp_path / "serve.yaml"
    result = subprocess.run([*run, "build", "--config", "configs/gpu.yaml", "--port", "8123", "-o", str(built)])
    assert result.returncode == 0
    written = yaml.safe_load(built.read_text())
    assert written["http_options"]["port"] == 8123
    assert [d["name"] for d in written["applications"][0]["deployments"]] == ["Ingress", "Preprocessor", "Generator"]

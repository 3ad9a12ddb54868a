"""The command line: a model that cannot be found stops ``run`` at once with one sentence, before Ray starts."""

from __future__ import annotations

import os
import subprocess
import sys


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

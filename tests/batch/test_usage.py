"""The batch's CPU and memory accounting over its process tree: a child's CPU time counts even after it exits,
and nothing is counted twice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from serve.batch.usage import PROC

pytestmark = pytest.mark.skipif(not PROC.is_dir(), reason="reads /proc")

ROOT = Path(__file__).resolve().parents[2]

BURN = """
import time
end = time.process_time() + float(__import__("sys").argv[1])
while time.process_time() < end:
    pass
time.sleep(0.3)  # alive a while after its work, so that a sample sees its last CPU time
"""

MEASURE = f"""
import json, subprocess, sys, time
from serve.batch.usage import TreeUsage
began = time.process_time()
usage = TreeUsage(every_s=0.05)
for seconds in ("0.4", "0.3"):
    subprocess.run([sys.executable, "-c", {BURN!r}, seconds], check=True)
found = usage.stop()
print(json.dumps({{**found, "own_cpu_s": time.process_time() - began}}))
"""


def test_the_cpu_of_children_that_exited_is_counted_once():
    # a process of its own, so that the tree measured is it and its two children (not this test's Ray, if any)
    done = subprocess.run([sys.executable, "-c", MEASURE], cwd=ROOT, capture_output=True, text=True, check=True)
    found = json.loads(done.stdout)
    children = found["cpu_s"] - found["own_cpu_s"]
    assert 0.6 <= children < 1.2  # their 0.7 s and start-up, in whole clock ticks; counted twice: 1.4 or more
    assert found["processes"] >= 2 and found["largest_worker_rss_mib"] > 0 and found["driver_rss_mib"] > 0
    assert found["tree_pss_mib"] >= found["driver_rss_mib"] / 4

"""The batch's CPU and memory accounting over its process tree: a child's CPU time counts even after it exits,
and nothing is counted twice."""

from __future__ import annotations

import subprocess
import sys

import pytest

from serve.batch.usage import PROC, TreeUsage

pytestmark = pytest.mark.skipif(not PROC.is_dir(), reason="reads /proc")

BURN = """
import time
end = time.process_time() + {seconds}
while time.process_time() < end:
    pass
time.sleep(0.3)  # alive a while after its work, so that a sample sees its last CPU time
"""


def test_the_cpu_of_children_that_exited_is_counted_once():
    usage = TreeUsage(every_s=0.05)
    for seconds in (0.4, 0.3):
        subprocess.run([sys.executable, "-c", BURN.format(seconds=seconds)], check=True)
    found = usage.stop()
    assert 0.7 <= found["cpu_s"] < 1.35  # both children's 0.7 s and their start-up; twice would be 1.4
    assert found["processes"] >= 2 and found["largest_worker_rss_mib"] > 0 and found["driver_rss_mib"] > 0
    assert found["tree_pss_mib"] >= found["driver_rss_mib"] / 4

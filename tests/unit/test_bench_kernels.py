"""``python -m bench.kernels`` on the CPU: every kernel timed by the ways that run here, one JSON row each."""

from __future__ import annotations

import json

from bench.kernels import main


def test_kernel_bench_writes_a_row_per_kernel_and_way(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # no Triton kernels on the CPU: the eager ways only
    main(["--out", str(tmp_path / "kernels.json"), "--quick"])
    result = json.loads((tmp_path / "kernels.json").read_text())
    assert result["gpu"] == "cpu"
    assert [(row["kernel"], row["way"]) for row in result["rows"]] == [
        ("gelu+layer_norm 142x256", "eager"),
        ("gelu+layer_norm 2x256", "eager"),
        ("quick_gelu 514x64", "eager"),
        ("vision sdpa 2x16x257x64", "default"),
    ]
    assert all(row["ms"] > 0 for row in result["rows"])
    assert result["rows"][0]["tb_per_s"] == 2 * 142 * 256 * 2 / result["rows"][0]["ms"] / 1e9

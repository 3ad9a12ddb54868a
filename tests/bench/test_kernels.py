"""``python -m bench.lab.kernels`` on the CPU: every kernel timed by the ways that run here, one JSON row each."""

from __future__ import annotations

import json

from bench.lab.kernels import main


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
        ("vision sdpa 2x16x256x64", "default"),
        ("prefill sdpa 2x32x72x64", "default"),
        ("add+layer_norm 514x16", "eager"),
        ("add+layer_norm 144x64", "eager"),
        ("vision embeddings 2x224x224", "model"),
        ("vision embeddings 2x224x224", "engine"),
        ("image projection 2x257x1024", "model"),
        ("image projection 2x257x1024", "engine"),
        ("fc2+residual 514x64->16", "product + add"),
        ("fc2+residual 514x64->16", "epilogue"),
        ("fc2+residual 142x256->64", "product + add"),
        ("fc2+residual 142x256->64", "epilogue"),
    ]
    assert all(row["ms"] > 0 for row in result["rows"])
    assert result["rows"][0]["tb_per_s"] == 2 * 142 * 256 * 2 / result["rows"][0]["ms"] / 1e9

"""Where requests spent their time, from Ingress log lines: medians per window, the rest derived."""

from __future__ import annotations

import json

from bench.lab.request_log import main, read, windows


def line(clock: str, status: int = 200, **timings: float) -> str:
    record = {"event": "request", "id": "chatcmpl-1", "status": status, **timings}
    return f"INFO 2026-11-26 {clock} kosmos2_Ingress ab12cd34 5f1e -- {json.dumps(record)}\n"


def test_windows_take_medians_of_the_timed_answers(tmp_path):
    timed = {"queued_s": 0.1, "prepare_s": 0.02, "generate_s": 0.5}
    (tmp_path / "replica_kosmos2_Ingress_a.log").write_text(
        line("10:00:00,100", latency_s=0.7, **timed)
        + "INFO 2026-11-26 10:00:01,000 kosmos2_Ingress ab12cd34 -- started\n"
        + line("10:00:01,500", latency_s=0.9, **{**timed, "generate_s": 0.7})
        + line("10:00:02,000", status=400, latency_s=0.01)  # counted a request, not timed
    )
    (tmp_path / "replica_kosmos2_Ingress_b.log").write_text(
        line("10:00:01,000", latency_s=0.8, **{**timed, "generate_s": 0.6})
        + line("10:00:03,000", latency_s=0.3, **timed)
    )
    (tmp_path / "replica_kosmos2_Generator_c.log").write_text(line("10:00:01,000", latency_s=5.0, **timed))
    records = read(sorted(tmp_path.glob("replica_*Ingress*.log")))
    assert [r["latency_s"] for r in records] == [0.7, 0.8, 0.9, 0.01, 0.3]
    first, second = windows(records, seconds=2)
    assert first["start_s"] == 0 and first["requests_per_s"] == 2  # four ended in the first two seconds
    assert first["latency_s"] == 0.8 and first["generate_s"] == 0.6 and first["queued_s"] == 0.1
    assert round(first["rest_s"], 6) == 0.08  # 0.8 - (0.1 + 0.02 + 0.6)
    assert second["start_s"] == 2 and second["requests_per_s"] == 0.5 and second["latency_s"] == 0.3


def test_the_command_writes_the_table(tmp_path, capsys):
    timed = {"queued_s": 0.1, "prepare_s": 0.02, "generate_s": 0.5}
    (tmp_path / "replica_kosmos2_Ingress_a.log").write_text(line("10:00:00,000", latency_s=0.7, **timed))
    main([str(tmp_path), "--out", str(tmp_path / "timings.md")])
    table = (tmp_path / "timings.md").read_text()
    assert table == capsys.readouterr().out
    assert table.splitlines()[2] == "| 0 | 0.200 | 0.700 | 0.100 | 0.020 | 0.500 | 0.080 |"

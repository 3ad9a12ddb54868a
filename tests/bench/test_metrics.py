"""Metric maths of the bench against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.metrics import BatchRecord, compute_engine_metrics, compute_metrics, percentile, time_series
from bench.records import CANCELLED, TIMEOUT, RequestRecord


def record(index, start, end, status=200, *, warmup=False, tokens=10, error_type=None, chunks=(), task="caption"):
    return RequestRecord(
        point=0,
        index=index,
        item=index,
        task=task,
        image_width=640,
        image_height=480,
        image_bytes=50_000,
        warmup=warmup,
        scheduled_s=start,
        start_s=start,
        end_s=end,
        status=status,
        prompt_tokens=70,
        completion_tokens=tokens if status == 200 and error_type is None else 0,
        first_token_s=chunks[0] if chunks else None,
        chunk_times_s=list(chunks),
        error_type=error_type,
    )


def test_percentiles_interpolate_between_ranks():
    latencies = [0.1 * i for i in range(1, 11)]  # 0.1 .. 1.0
    # rank (n - 1) q / 100 = 9 q / 100: p50 at 4.5 -> 0.55, p90 at 8.1 -> 0.91, p99 at 8.91 -> 0.991
    assert percentile(latencies, 50) == pytest.approx(0.55)
    assert percentile(latencies, 90) == pytest.approx(0.91)
    assert percentile(latencies, 99) == pytest.approx(0.991)
    assert percentile([2.0], 99) == 2.0


@given(st.lists(st.floats(0, 1e4, allow_nan=False), min_size=1, max_size=50), st.floats(0, 100))
def test_a_percentile_lies_within_the_values(values, q):
    assert min(values) - 1e-6 <= percentile(values, q) <= max(values) + 1e-6


def test_a_run_with_warmup_errors_timeouts_and_cancellations():
    records = [
        record(0, 0.0, 0.8, warmup=True),  # warm-up: ends before the window
        record(1, 0.5, 1.5, warmup=True),  # warm-up: ends inside the window, so it counts towards throughput
        record(2, 1.0, 2.0, tokens=20),
        record(3, 1.2, 2.4, tokens=30),
        record(4, 2.0, 2.1, status=429, error_type="rate_limit_error"),
        record(5, 2.5, 3.0, status=0, error_type=TIMEOUT),
        record(6, 3.0, 3.5, status=504, error_type=TIMEOUT),
        record(7, 3.5, 6.0, tokens=40),  # ends after the window
        record(8, 4.0, 9.0, status=0, error_type=CANCELLED),
    ]
    m = compute_metrics(records, window_start_s=1.0, window_end_s=5.0, slo_p99_s=1.1)
    assert (m.window_s, m.requests, m.ok, m.errors, m.timeouts, m.incomplete) == (4.0, 7, 3, 3, 2, 1)
    assert m.errors_by_status == {"0": 1, "429": 1, "504": 1}
    assert m.error_rate == pytest.approx(3 / 7) and m.timeout_rate == pytest.approx(2 / 7)
    # In the window [1, 5): records 1, 2, 3 succeed; 4, 5, 6 fail.
    assert m.images_per_s == pytest.approx(3 / 4)
    assert m.requests_per_s == pytest.approx(6 / 4)
    assert m.output_tokens_per_s == pytest.approx((10 + 20 + 30) / 4)
    # Latencies of steady successes: 1.0, 1.2, 2.5.
    assert m.latency_mean_s == pytest.approx(4.7 / 3)
    assert m.latency_p50_s == pytest.approx(1.2)
    assert m.latency_p90_s == pytest.approx(1.2 + 0.8 * 1.3)
    assert m.latency_max_s == pytest.approx(2.5)
    assert m.completion_tokens_mean == pytest.approx(30.0)
    # SLO 1.1 s: one of seven steady requests met it; in the window, records 1 and 2 (1.0 s each).
    assert m.slo_attainment == pytest.approx(1 / 7)
    assert m.goodput_images_per_s == pytest.approx(2 / 4)
    assert m.slo_met is False
    # not streamed: no TTFT, TPOT or ITL; E2EL is the latency, in milliseconds
    assert m.latency_ms["mean_ttft_ms"] is m.latency_ms["p99_itl_ms"] is m.latency_ms["median_tpot_ms"] is None
    assert m.latency_ms["mean_e2el_ms"] == pytest.approx(1000 * m.latency_mean_s)
    assert m.latency_ms["p90_e2el_ms"] == pytest.approx(1000 * m.latency_p90_s)
    assert m.request_goodput is None and m.goodput_slos_ms is None


def test_streaming_latencies_as_vllm_defines_them():
    records = [
        # TTFT 0.2, gaps 0.1 0.2 0.5, 10 tokens: TPOT (1.0 - 0.2) / 9
        record(0, 0.0, 1.0, tokens=10, chunks=(0.2, 0.3, 0.5, 1.0)),
        # TTFT 0.4, gap 0.1, 3 tokens: TPOT (0.6 - 0.4) / 2
        record(1, 1.0, 1.6, tokens=3, chunks=(1.4, 1.5)),
        # one token: no TPOT
        record(2, 1.0, 1.3, tokens=1, chunks=(1.3,)),
    ]
    m = compute_metrics(records, 0.0, 2.0, percentiles=(50, 99, 99.9))
    stats = m.latency_ms
    ttft = np.array([0.2, 0.4, 0.3]) * 1000
    assert stats["mean_ttft_ms"] == pytest.approx(ttft.mean()) and stats["median_ttft_ms"] == pytest.approx(300)
    assert stats["std_ttft_ms"] == pytest.approx(ttft.std())  # the population's, as numpy and vLLM
    assert stats["p99_ttft_ms"] == pytest.approx(np.percentile(ttft, 99))
    assert stats["p99.9_ttft_ms"] == pytest.approx(np.percentile(ttft, 99.9))
    tpot = np.array([0.8 / 9, 0.1]) * 1000
    assert stats["mean_tpot_ms"] == pytest.approx(tpot.mean()) and stats["std_tpot_ms"] == pytest.approx(tpot.std())
    itl = np.array([0.1, 0.2, 0.5, 0.1]) * 1000
    assert stats["median_itl_ms"] == pytest.approx(150) and stats["mean_itl_ms"] == pytest.approx(itl.mean())
    assert stats["p99_itl_ms"] == pytest.approx(np.percentile(itl, 99))
    assert stats["median_e2el_ms"] == pytest.approx(600) and "p90_e2el_ms" not in stats


def test_goodput_counts_the_requests_that_meet_every_slo():
    records = [
        record(0, 0.0, 1.0, tokens=10, chunks=(0.2, 1.0)),  # TTFT 200 ms, TPOT 89 ms, E2EL 1000 ms
        record(1, 0.5, 1.1, tokens=3, chunks=(0.9, 1.1)),  # TTFT 400 ms, TPOT 100 ms, E2EL 600 ms
        record(2, 1.0, 1.2, tokens=1, chunks=(1.2,)),  # TTFT 200 ms, one token (TPOT 0), E2EL 200 ms
        record(3, 1.0, 1.9, status=503, error_type="service_unavailable"),
        record(4, 1.5, 2.5, tokens=2, chunks=(1.6, 2.5)),  # ends after the window
    ]
    goodput = lambda slos: compute_metrics(records, 0.0, 2.0, goodput_slos_ms=slos).request_goodput  # noqa: E731
    assert goodput({"ttft": 300}) == pytest.approx(2 / 2.0)
    assert goodput({"ttft": 300, "tpot": 50}) == pytest.approx(1 / 2.0)
    assert goodput({"e2el": 600}) == pytest.approx(2 / 2.0)
    assert goodput({"ttft": 500, "tpot": 100, "e2el": 1000}) == pytest.approx(3 / 2.0)
    assert compute_metrics(records, 0.0, 2.0, goodput_slos_ms={"e2el": 1}).goodput_slos_ms == {"e2el": 1}


def test_an_empty_window_is_refused():
    with pytest.raises(ValueError, match="empty"):
        compute_metrics([], 3.0, 3.0)


def test_a_point_with_no_success_has_no_latency():
    m = compute_metrics([record(0, 0.0, 0.1, status=500, error_type="server_error")], 0.0, 1.0, slo_p99_s=1.0)
    assert m.latency_p99_s is None and m.images_per_s == 0.0 and m.slo_met is False
    assert m.errors_by_status == {"500": 1} and m.error_rate == 1.0


def test_time_series_bins_sends_completions_and_latency():
    records = [
        record(0, 0.1, 0.6),
        record(1, 0.2, 2.7),
        record(2, 1.5, 1.6, status=503, error_type="service_unavailable"),
        record(3, 2.2, 2.4),
        record(4, 2.9, 9.0, status=0, error_type=CANCELLED),
    ]
    bins = time_series(records, 1.0, 3.0)
    assert [b.t_s for b in bins] == [0.0, 1.0, 2.0]
    assert [b.sent_per_s for b in bins] == [2.0, 1.0, 2.0]
    assert [b.completed_per_s for b in bins] == [1.0, 1.0, 2.0]
    assert [b.errors_per_s for b in bins] == [0.0, 1.0, 0.0]
    assert bins[0].latency_p50_s == pytest.approx(0.5) and bins[1].latency_p50_s is None
    assert bins[2].latency_p50_s == pytest.approx(1.35)  # 0.2 and 2.5
    halves = time_series(records, 0.5, 3.0)
    assert len(halves) == 6 and sum(b.sent_per_s * 0.5 for b in halves) == len(records)
    for end, last in ((2.6, 0.6), (3.4, 1.4)):  # the last bin ends at the end: never a sliver
        bins = time_series(records, 1.0, end)
        assert [b.t_s for b in bins] == [0.0, 1.0, 2.0]
        assert bins[-1].sent_per_s == pytest.approx(2 / last) and bins[-1].completed_per_s == pytest.approx(2 / last)


def test_engine_metrics():
    batches = [
        BatchRecord("fast", 8, 0, 0.5, 560, 100, 4),
        BatchRecord("fast", 8, 1, 0.3, 560, 60, 2),
        BatchRecord("fast", 8, 2, 0.2, 560, 80, 0),
    ]
    m = compute_engine_metrics(batches)
    assert m.images == 24 and m.iterations == 3
    assert m.images_per_s == pytest.approx(24.0)
    assert m.latency_s == pytest.approx(1 / 3)
    assert m.latency_p50_s == pytest.approx(0.3)
    assert m.tokens_per_s == pytest.approx(240.0)
    assert m.completion_tokens_mean == pytest.approx(10.0)
    assert m.finished_by_length_fraction == pytest.approx(0.25)
    assert m.max_tokens == 0  # the batches did not say
    with pytest.raises(ValueError):
        compute_engine_metrics([*batches, BatchRecord("hf", 8, 0, 1.0, 560, 8, 0)])
    with pytest.raises(ValueError, match="output length"):
        compute_engine_metrics([*batches, BatchRecord("fast", 8, 0, 1.0, 560, 8, 0, max_tokens=16)])


def test_metrics_of_random_runs_are_consistent():
    rng = np.random.default_rng(0)
    starts = np.sort(rng.uniform(0, 10, 200))
    ends = starts + rng.exponential(0.5, 200)
    statuses = rng.choice([200, 200, 200, 500], 200)
    records = [
        record(i, s, e, int(c), error_type=None if c == 200 else "server_error")
        for i, (s, e, c) in enumerate(zip(starts, ends, statuses))
    ]
    m = compute_metrics(records, 0.0, 10.0)
    assert m.ok + m.errors == m.requests == 200
    done = sum(e < 10.0 for e in ends)
    assert m.requests_per_s * 10 == pytest.approx(done)
    assert m.latency_p50_s <= m.latency_p90_s <= m.latency_p95_s <= m.latency_p99_s <= m.latency_max_s

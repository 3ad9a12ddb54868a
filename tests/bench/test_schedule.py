"""The send schedule's pure parts: arrival processes, shapes, sweeps and the no-catch-up rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bench.schedule import (
    LoadConfig,
    Lookahead,
    RateSegment,
    arrival_times,
    latest_due,
    parse_shape,
    shape_steps,
    sweep,
)


def gaps(rate: float, burstiness: float, seconds: float = 2000.0, seed: int = 0) -> np.ndarray:
    times = np.array(list(arrival_times([(0.0, seconds, rate)], burstiness, np.random.default_rng(seed))))
    assert (np.diff(times) >= 0).all() and times[-1] < seconds
    return np.diff(times)


@pytest.mark.parametrize("burstiness", [1.0, 0.25, 4.0])
def test_arrivals_have_the_rate_and_the_burstiness_asked_for(burstiness):
    g = gaps(10.0, burstiness)
    # 20,000 arrivals: the mean gap within 3% of 0.1 s; a gamma(k) gap has squared coefficient of variation 1/k.
    assert g.mean() == pytest.approx(0.1, rel=0.03)
    assert g.var() / g.mean() ** 2 == pytest.approx(1 / burstiness, rel=0.1)


def test_arrivals_follow_a_shape():
    steps = shape_steps(parse_shape("5:100,5-25:100,25:100"))
    times = np.array(list(arrival_times(steps, 1.0, np.random.default_rng(1))))
    counts = np.histogram(times, bins=[0, 100, 200, 300])[0]
    assert counts == pytest.approx([500, 1500, 2500], rel=0.1)
    assert times.max() < 300


def test_a_zero_rate_segment_sends_nothing():
    steps = [(0.0, 5.0, 0.0), (5.0, 10.0, 50.0)]
    times = list(arrival_times(steps, 1.0, np.random.default_rng(0)))
    assert times and min(times) >= 5.0


def test_arrivals_are_reproducible_from_the_seed():
    def first(seed):
        arrivals = arrival_times([(0.0, np.inf, 3.0)], 1.0, np.random.default_rng(seed))
        return list(itertools.islice(arrivals, 20))

    assert first(3) == first(3) != first(4)


def test_shapes():
    assert parse_shape("2:30,2-20:60,20:30") == (
        RateSegment(30.0, 2.0, 2.0),
        RateSegment(60.0, 2.0, 20.0),
        RateSegment(30.0, 20.0, 20.0),
    )
    steps = shape_steps(parse_shape("0-10:4"), step_s=2.0)
    assert steps == [(0.0, 2.0, 2.5), (2.0, 4.0, 7.5)]
    for bad in ("2", "2:0", "a:3", "-1:5"):
        with pytest.raises(ValueError):
            parse_shape(bad)


def test_sweeps():
    closed = sweep(concurrency=[1, 4, 16])
    assert [(p.mode, p.concurrency, p.x) for p in closed] == [
        ("closed", 1, 1.0),
        ("closed", 4, 4.0),
        ("closed", 16, 16.0),
    ]
    assert all(p.steps() is None for p in closed)
    [open_point] = sweep(rates=[2.5])
    assert open_point.steps() == [(0.0, np.inf, 2.5)] and open_point.x == 2.5
    [shaped] = sweep(shape="2:30,2-20:60")
    assert shaped.mode == "shape" and shaped.shape_duration_s == 90.0
    assert shaped.rate == pytest.approx((2 * 30 + 11 * 60) / 90)
    for kwargs in ({}, {"concurrency": [0]}, {"rates": [0.0]}):
        with pytest.raises(ValueError):
            sweep(**kwargs)


def test_a_shape_warms_up_by_seconds_only():
    shaped = sweep(shape="5:10")
    LoadConfig(warmup_s=2).check(shaped)
    with pytest.raises(ValueError, match="warms up by seconds"):
        LoadConfig(warmup_requests=5).check(shaped)
    with pytest.raises(ValueError, match="shorter than the shape"):
        LoadConfig(warmup_s=10).check(shaped)


def test_no_catch_up_after_a_stall():
    arrivals = Lookahead(iter([0.0, 0.1, 0.2, 0.3, 0.98, 1.0, 1.5]))
    # The dispatcher got its slot back at t = 1.0 after a stall: 0.0 .. 0.3 are long overdue and skipped,
    # 0.98 is only 20 ms late (jitter) and goes; 1.0 stays for the next turn; 1.5 is not due.
    assert latest_due(arrivals, arrivals.take(), now=1.0, max_lag_s=0.05) == (0.98, 4)
    assert arrivals.take() == 1.0 and arrivals.head == 1.5
    # With nothing newer due, even a late arrival goes.
    late = Lookahead(iter([0.0, 5.0]))
    assert latest_due(late, late.take(), now=1.0, max_lag_s=0.05) == (0.0, 0)

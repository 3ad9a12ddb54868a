"""Metric maths over per-request records: pure functions, no I/O, no clock.

- :func:`compute_metrics`: one load point's throughput, latency percentiles, error and timeout rates by status
  code, the latencies of ``bench.latency`` (TTFT, TPOT, ITL, E2EL) and goodput under SLOs, over its steady window.
- :func:`time_series`: per-interval send rate, completion rate and latency, for shaped (autoscaling) runs.
- :func:`compute_engine_metrics`: the engine-only mode's throughput and latency over timed batches.

Definitions (as in vLLM's ``bench serve`` and llmperf):

- Rates count completions whose *end* falls inside the steady window ``[start, end)``, divided by its length;
  ``images_per_s`` counts successful ones (one image per request), ``requests_per_s`` every answered one.
- Latency, TTFT, TPOT and ITL are taken over the point's steady requests (sent after warm-up), successes only
  (``bench.latency`` defines them).
- Error and timeout rates are over steady requests; requests cut off at the end of the drain are counted as
  ``incomplete``, not as errors.
- Goodput counts successful completions in the window that meet the SLO: ``goodput_images_per_s`` the p99
  latency SLO's (``--slo-p99``, seconds), ``request_goodput`` every SLO of ``--goodput`` at once (ms).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bench.latency import DEFAULT_PERCENTILES, RequestLatency, latency_stats
from bench.records import CANCELLED, TIMEOUT, RequestRecord

PERCENTILES = (50, 90, 95, 99)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile with linear interpolation between closest ranks (numpy's default); None if empty.

    >>> percentile([1.0, 2.0, 3.0, 4.0], 50)
    2.5
    >>> percentile([0.1] * 9 + [1.0], 90), percentile([0.1] * 9 + [1.0], 99)
    (0.19, 0.919)
    >>> percentile([], 50) is None
    True
    """
    if not len(values):
        return None
    return round(float(np.percentile(np.asarray(values, dtype=np.float64), q)), 9)


@dataclass
class Metrics:
    """One load point's numbers; latencies in seconds, rates per second; None where nothing was measured."""

    window_s: float
    requests: int
    ok: int
    errors: int
    timeouts: int
    incomplete: int
    errors_by_status: dict[str, int]
    error_rate: float
    timeout_rate: float
    requests_per_s: float
    images_per_s: float
    output_tokens_per_s: float
    completion_tokens_mean: float | None
    latency_mean_s: float | None
    latency_p50_s: float | None
    latency_p90_s: float | None
    latency_p95_s: float | None
    latency_p99_s: float | None
    latency_max_s: float | None
    input_tokens_per_s: float = 0.0
    """Prompt tokens of the successful requests that ended in the window, a second."""
    latency_ms: dict[str, float | None] = field(default_factory=dict)
    """``bench.latency``'s statistics under vLLM's names (``mean_ttft_ms``, ``p99_e2el_ms`` ...)."""
    slo_p99_s: float | None = None
    slo_attainment: float | None = None
    goodput_images_per_s: float | None = None
    slo_met: bool | None = None
    goodput_slos_ms: dict[str, float] | None = None
    request_goodput: float | None = None
    """Completions a second in the window that met every SLO of ``goodput_slos_ms``."""

    def to_dict(self) -> dict[str, Any]:
        """The fields, the latency statistics flattened into them."""
        data = asdict(self)
        return {**data, **data.pop("latency_ms")}


def compute_metrics(
    records: Sequence[RequestRecord],
    window_start_s: float,
    window_end_s: float,
    slo_p99_s: float | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    goodput_slos_ms: dict[str, float] | None = None,
) -> Metrics:
    """The metrics of one load point's records over its steady window ``[window_start_s, window_end_s)``.

    >>> r = lambda i, start, end, status=200, warm=False, tokens=10: RequestRecord(0, i, i, "caption", 64, 48,
    ...     100, warm, start, start, end, status, prompt_tokens=80, completion_tokens=tokens)
    >>> records = [r(0, 0.0, 0.9, warm=True), r(1, 1.0, 2.0), r(2, 1.5, 2.5), r(3, 2.0, 2.2, 503), r(4, 3.0, 4.5)]
    >>> m = compute_metrics(records, 1.0, 3.0, slo_p99_s=1.0)
    >>> m.requests, m.ok, m.errors, m.errors_by_status, m.error_rate
    (4, 3, 1, {'503': 1}, 0.25)
    >>> m.images_per_s, m.requests_per_s, m.output_tokens_per_s  # ends at 2.0 and 2.5 (and 2.2) in [1, 3)
    (1.0, 1.5, 10.0)
    >>> m.latency_p50_s, m.latency_max_s, m.slo_attainment, m.goodput_images_per_s, m.slo_met
    (1.0, 1.5, 0.5, 1.0, False)
    >>> m.input_tokens_per_s, m.latency_ms["median_e2el_ms"], m.latency_ms["p99_ttft_ms"]  # not streamed: no TTFT
    (80.0, 1000.0, None)
    """
    window_s = window_end_s - window_start_s
    if window_s <= 0:
        raise ValueError(f"the steady window is empty: [{window_start_s}, {window_end_s})")
    steady = [r for r in records if not r.warmup]
    finished = [r for r in steady if r.error_type != CANCELLED]
    ok = [r for r in finished if r.ok]
    failed = [r for r in finished if not r.ok]
    in_window = [r for r in records if r.error_type != CANCELLED and window_start_s <= r.end_s < window_end_s]
    ok_in_window = [r for r in in_window if r.ok]
    latencies = [r.latency_s for r in ok]
    timeouts = sum(r.error_type == TIMEOUT for r in failed)
    by_status = Counter(str(r.status) for r in failed)
    tokens = [r.completion_tokens for r in ok]
    metrics = Metrics(
        window_s=window_s,
        requests=len(steady),
        ok=len(ok),
        errors=len(failed),
        timeouts=timeouts,
        incomplete=len(steady) - len(finished),
        errors_by_status=dict(sorted(by_status.items())),
        error_rate=len(failed) / len(steady) if steady else 0.0,
        timeout_rate=timeouts / len(steady) if steady else 0.0,
        requests_per_s=len(in_window) / window_s,
        images_per_s=len(ok_in_window) / window_s,
        output_tokens_per_s=sum(r.completion_tokens for r in ok_in_window) / window_s,
        completion_tokens_mean=float(np.mean(tokens)) if tokens else None,
        latency_mean_s=float(np.mean(latencies)) if latencies else None,
        latency_p50_s=percentile(latencies, 50),
        latency_p90_s=percentile(latencies, 90),
        latency_p95_s=percentile(latencies, 95),
        latency_p99_s=percentile(latencies, 99),
        latency_max_s=max(latencies) if latencies else None,
        input_tokens_per_s=sum(r.prompt_tokens for r in ok_in_window) / window_s,
        latency_ms=latency_stats([request_latency(r) for r in ok], percentiles),
    )
    if goodput_slos_ms:
        metrics.goodput_slos_ms = dict(goodput_slos_ms)
        good = sum(request_latency(r).meets(goodput_slos_ms) for r in ok_in_window)
        metrics.request_goodput = good / window_s
    if slo_p99_s is not None:
        metrics.slo_p99_s = slo_p99_s
        metrics.slo_attainment = sum(lat <= slo_p99_s for lat in latencies) / len(steady) if steady else None
        metrics.goodput_images_per_s = sum(r.latency_s <= slo_p99_s for r in ok_in_window) / window_s
        metrics.slo_met = metrics.latency_p99_s is not None and metrics.latency_p99_s <= slo_p99_s
    return metrics


def request_latency(record: RequestRecord) -> RequestLatency:
    """A request's latencies (``bench.latency``) from its record."""
    return RequestLatency.of(record.start_s, record.end_s, record.chunk_times_s, record.completion_tokens)


@dataclass
class SeriesBin:
    """One interval of a run's time series: sends, answers and latency of the answers that ended in it."""

    t_s: float
    sent_per_s: float
    completed_per_s: float
    errors_per_s: float
    latency_p50_s: float | None
    latency_p99_s: float | None


def time_series(records: Sequence[RequestRecord], bin_s: float, end_s: float) -> list[SeriesBin]:
    """Per-``bin_s`` rates and latencies from time 0 to ``end_s`` (warm-up included: it is part of the run).
    The last bin ends at ``end_s``, so it is between half a bin and a bin and a half long (a sliver of a bin
    would turn the drain's last few answers into a spike), and its rates divide by its own length.

    >>> r = lambda start, end, status=200: RequestRecord(0, 0, 0, "caption", 1, 1, 1, False, start, start, end, status)
    >>> bins = time_series([r(0.1, 0.5), r(0.2, 1.4), r(1.1, 1.3, 500)], 1.0, 2.0)
    >>> [(b.t_s, b.sent_per_s, b.completed_per_s, b.errors_per_s, b.latency_p50_s) for b in bins]
    [(0.0, 2.0, 1.0, 0.0, 0.4), (1.0, 1.0, 2.0, 1.0, 1.2)]
    >>> [b.completed_per_s for b in time_series([r(0.1, 0.5), r(0.2, 1.4), r(1.1, 1.3, 500)], 1.0, 1.5)]
    [1.0, 4.0]
    >>> [b.completed_per_s for b in time_series([r(0.1, 0.5), r(0.2, 1.4), r(1.1, 1.3, 500)], 1.0, 1.25)]
    [2.4]
    """
    count = max(1, int(end_s / bin_s + 0.5))
    sent = np.zeros(count)
    done = np.zeros(count)
    errors = np.zeros(count)
    latencies: list[list[float]] = [[] for _ in range(count)]
    for r in records:
        sent[min(count - 1, int(r.start_s // bin_s))] += 1
        if r.error_type == CANCELLED:
            continue
        slot = min(count - 1, int(r.end_s // bin_s))
        done[slot] += 1
        if r.ok:
            latencies[slot].append(r.latency_s)
        else:
            errors[slot] += 1
    widths = [bin_s] * (count - 1) + [end_s - (count - 1) * bin_s if end_s > 0 else bin_s]
    return [
        SeriesBin(
            round(i * bin_s, 9),
            float(sent[i] / widths[i]),
            float(done[i] / widths[i]),
            float(errors[i] / widths[i]),
            percentile(latencies[i], 50),
            percentile(latencies[i], 99),
        )
        for i in range(count)
    ]


@dataclass
class BatchRecord:
    """One timed ``engine.generate`` call of the engine-only mode."""

    path: str
    batch_size: int
    iteration: int
    seconds: float
    prompt_tokens: int
    completion_tokens: int
    finished_by_length: int
    max_tokens: int = 0
    """The new tokens each request of the batch could generate (exactly, with ignore_eos)."""


@dataclass
class EngineMetrics:
    """One engine path at one batch size and output length: images/s, batch latency, output tokens/s."""

    path: str
    batch_size: int
    iterations: int
    images_per_s: float
    latency_s: float
    latency_p50_s: float | None
    latency_p99_s: float | None
    tokens_per_s: float
    completion_tokens_mean: float
    finished_by_length_fraction: float
    images: int = field(default=0)
    max_tokens: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compute_engine_metrics(batches: Sequence[BatchRecord]) -> EngineMetrics:
    """Throughput and latency of timed batches of one path, batch size and output length (a batch's latency is
    every one of its requests' latency, since a static batch ends together).

    >>> b = [BatchRecord("hf", 4, i, s, 280, t, 2) for i, (s, t) in enumerate([(1.0, 40), (3.0, 60)])]
    >>> m = compute_engine_metrics(b)
    >>> m.images_per_s, m.latency_s, m.tokens_per_s, m.completion_tokens_mean, m.finished_by_length_fraction
    (2.0, 2.0, 25.0, 12.5, 0.5)
    """
    if not batches or len({(b.path, b.batch_size, b.max_tokens) for b in batches}) != 1:
        raise ValueError("compute_engine_metrics takes the batches of one path, batch size and output length")
    seconds = sum(b.seconds for b in batches)
    images = sum(b.batch_size for b in batches)
    latencies = [b.seconds for b in batches]
    return EngineMetrics(
        path=batches[0].path,
        batch_size=batches[0].batch_size,
        iterations=len(batches),
        images_per_s=images / seconds,
        latency_s=seconds / len(batches),
        latency_p50_s=percentile(latencies, 50),
        latency_p99_s=percentile(latencies, 99),
        tokens_per_s=sum(b.completion_tokens for b in batches) / seconds,
        completion_tokens_mean=sum(b.completion_tokens for b in batches) / images,
        finished_by_length_fraction=sum(b.finished_by_length for b in batches) / images,
        images=images,
        max_tokens=batches[0].max_tokens,
    )

"""Per-request latencies as vLLM's ``bench serve`` defines them, their statistics, and goodput under SLOs.

For one streamed request (times from ``bench.records.RequestRecord``, seconds):

- TTFT, time to first token: from sending the request to the first chunk that carries text (an answer with
  none, an empty one, has no TTFT; for goodput its first token came with its end);
- TPOT, time per output token after the first: ``(E2EL - TTFT) / (completion_tokens - 1)``, for answers of more
  than one token (``completion_tokens`` is the server's ``usage``, the end token included);
- ITL, inter-token latency: the gaps between consecutive chunks that carry text (a chunk may carry several
  tokens: the service sends text pieces, held back only where a grounding tag is still incomplete);
- E2EL, end-to-end latency: from sending the request to the end of its answer (non-streamed requests too).

Each metric is summarized by its mean, median, standard deviation (numpy's: of the population) and the
percentiles asked for, in milliseconds, under vLLM's names: ``mean_ttft_ms``, ``median_ttft_ms``,
``std_ttft_ms``, ``p99_ttft_ms``, ``p99.9_itl_ms`` ... A request is *good* when it meets every SLO given
(``ttft:300 tpot:50 e2el:2000``, milliseconds, as vLLM's ``--goodput``); for goodput an answer of a single token
counts a TPOT of 0, as in vLLM.

    >>> stats = latency_summary("ttft", [0.1, 0.2, 0.3, 0.4], (50, 99.9))
    >>> stats["mean_ttft_ms"], stats["median_ttft_ms"], stats["p99.9_ttft_ms"]
    (250.0, 250.0, 399.7)
    >>> parse_goodput(["ttft:300", "e2el:2000"])
    {'ttft': 300.0, 'e2el': 2000.0}
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

METRICS = ("ttft", "tpot", "itl", "e2el")
"""The latency metrics, by their names in vLLM's result files."""

STREAMED_METRICS = ("ttft", "tpot", "itl")
"""The metrics only a streamed answer has."""

DEFAULT_PERCENTILES = (50.0, 90.0, 99.0)
"""Percentiles reported when none are asked for."""


@dataclass(frozen=True)
class RequestLatency:
    """One successful request's latencies in seconds; the streamed ones are None for a non-streamed answer."""

    e2el: float
    ttft: float | None = None
    tpot: float | None = None
    itls: tuple[float, ...] = ()

    @classmethod
    def of(cls, start_s: float, end_s: float, chunk_times_s: Sequence[float], completion_tokens: int) -> RequestLatency:
        """From a request's send and end times, the arrival times of its chunks with text, and its token count.

        >>> RequestLatency.of(1.0, 2.0, [1.2, 1.5, 2.0], completion_tokens=5)
        RequestLatency(e2el=1.0, ttft=0.2, tpot=0.2, itls=(0.3, 0.5))
        """
        e2el = round(end_s - start_s, 9)
        if not chunk_times_s:
            return cls(e2el)
        ttft = round(chunk_times_s[0] - start_s, 9)
        tpot = round((e2el - ttft) / (completion_tokens - 1), 9) if completion_tokens > 1 else None
        itls = tuple(round(b - a, 9) for a, b in pairwise(chunk_times_s))
        return cls(e2el, ttft, tpot, itls)

    def meets(self, slos_ms: dict[str, float]) -> bool:
        """Whether every SLO holds (``ttft``, ``tpot``, ``e2el`` in ms). An answer that streamed no text before
        its end (an empty one) had its first token when it ended: its TTFT counts as its E2EL here.

        >>> RequestLatency(1.0, 0.2, None).meets({"tpot": 10, "e2el": 1000})
        True
        >>> RequestLatency(1.0).meets({"ttft": 500}), RequestLatency(0.2).meets({"ttft": 500})
        (False, True)
        """
        ttft = self.ttft if self.ttft is not None else self.e2el
        values = {"ttft": ttft, "tpot": self.tpot if self.tpot is not None else 0.0, "e2el": self.e2el}
        return all(values[name] * 1000 <= limit for name, limit in slos_ms.items())


def percentile_key(q: float) -> str:
    """vLLM's spelling of a percentile in a field name.

    >>> percentile_key(99.0), percentile_key(99.9)
    ('p99', 'p99.9')
    """
    return f"p{int(q)}" if int(q) == q else f"p{q}"


def latency_summary(metric: str, values_s: Sequence[float], percentiles: Iterable[float]) -> dict[str, float | None]:
    """Mean, median, standard deviation and percentiles of one metric, in ms (None for each when empty)."""
    names = [f"mean_{metric}_ms", f"median_{metric}_ms", f"std_{metric}_ms"]
    names += [f"{percentile_key(q)}_{metric}_ms" for q in percentiles]
    if not len(values_s):
        return dict.fromkeys(names, None)
    ms = np.asarray(values_s, dtype=np.float64) * 1000
    figures = [ms.mean(), np.median(ms), ms.std(), *(np.percentile(ms, q) for q in percentiles)]
    return {name: round(float(value), 6) for name, value in zip(names, figures)}


def latency_stats(latencies: Sequence[RequestLatency], percentiles: Iterable[float]) -> dict[str, float | None]:
    """Every metric's summary over a point's successful requests (ITL over every gap of every request)."""
    percentiles = tuple(percentiles)
    values = {
        "ttft": [r.ttft for r in latencies if r.ttft is not None],
        "tpot": [r.tpot for r in latencies if r.tpot is not None],
        "itl": [gap for r in latencies for gap in r.itls],
        "e2el": [r.e2el for r in latencies],
    }
    stats: dict[str, float | None] = {}
    for metric in METRICS:
        stats |= latency_summary(metric, values[metric], percentiles)
    return stats


def parse_percentiles(text: str) -> tuple[float, ...]:
    """``"50,90,99.9"`` -> ``(50.0, 90.0, 99.9)``; each within [0, 100].

    >>> parse_percentiles("50, 99")
    (50.0, 99.0)
    """
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"percentiles are numbers separated by commas, e.g. 50,90,99; got {text!r}") from None
    if not values or not all(0 <= v <= 100 for v in values):
        raise ValueError(f"percentiles must lie within [0, 100]; got {text!r}")
    return values


def parse_goodput(items: Iterable[str]) -> dict[str, float]:
    """SLOs from ``KEY:MILLISECONDS`` items, KEY one of ttft, tpot, e2el (vLLM's ``--goodput``)."""
    slos: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition(":")
        try:
            limit = float(value)
        except ValueError:
            limit = -1.0
        if not sep or name not in ("ttft", "tpot", "e2el") or limit < 0:
            raise ValueError(
                f"a goodput SLO is KEY:MILLISECONDS with KEY ttft, tpot or e2el and a value >= 0, e.g. ttft:500; "
                f"got {item!r}"
            )
        slos[name] = limit
    return slos

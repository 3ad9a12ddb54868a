"""The service's own Prometheus metrics, beside Serve's (exported by Ray's metrics agent).

Ingress: ``kosmos_requests_total`` {task, status, stream}, ``kosmos_request_latency_seconds`` {task},
``kosmos_tokens_total`` {kind: prompt|completion}. Generator: ``kosmos_engine_waiting`` (queue depth),
``kosmos_engine_running`` (sequences in the batch), ``kosmos_engine_steps_total`` and
``kosmos_engine_generated_tokens_total``. Serve adds its own tags (deployment, replica, application).
"""

from __future__ import annotations

from typing import Any

from ray.serve.metrics import Counter, Gauge, Histogram

from serve.engine.messages import EngineStats

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0]


class RequestMetrics:
    """Per-request counters of the Ingress."""

    def __init__(self) -> None:
        self.requests = Counter(
            "kosmos_requests_total",
            description="Chat completion requests answered",
            tag_keys=("task", "status", "stream"),
        )
        self.latency = Histogram(
            "kosmos_request_latency_seconds",
            description="Time to the full answer",
            boundaries=LATENCY_BUCKETS,
            tag_keys=("task",),
        )
        self.tokens = Counter("kosmos_tokens_total", description="Tokens in answered requests", tag_keys=("kind",))

    def observe(self, record: dict[str, Any]) -> None:
        task = record.get("task") or "none"
        self.requests.inc(tags={"task": task, "status": str(record["status"]), "stream": str(record["stream"])})
        if record["status"] == 200:
            self.latency.observe(record["latency_s"], tags={"task": task})
            self.tokens.inc(record.get("prompt_tokens", 0), tags={"kind": "prompt"})
            self.tokens.inc(record.get("completion_tokens", 0), tags={"kind": "completion"})


class EngineMetrics:
    """Gauges and counters of the Generator's engine, sampled from its stats."""

    def __init__(self) -> None:
        self.waiting = Gauge("kosmos_engine_waiting", description="Requests waiting for a cache slot")
        self.running = Gauge("kosmos_engine_running", description="Sequences in the running batch")
        self.steps = Counter("kosmos_engine_steps_total", description="Engine steps")
        self.tokens = Counter("kosmos_engine_generated_tokens_total", description="Tokens generated")
        self.last = EngineStats()

    def sample(self, stats: EngineStats) -> None:
        self.waiting.set(stats.waiting)
        self.running.set(stats.running)
        if stats.steps > self.last.steps:
            self.steps.inc(stats.steps - self.last.steps)
        if stats.generated_tokens > self.last.generated_tokens:
            self.tokens.inc(stats.generated_tokens - self.last.generated_tokens)
        self.last = EngineStats(**vars(stats))

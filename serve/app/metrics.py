"""The service's own Prometheus metrics, beside Serve's (exported by Ray's metrics agent, which names them
``ray_<name>``; ``deploy/grafana/kosmos2.json`` charts them).

Ingress, one observation per answered request (status 200):

- ``kosmos_requests_total`` {task, status, stream}: every request, answered or refused;
- ``kosmos_request_latency_seconds`` {task}: from the request's arrival to the full answer;
- ``kosmos_request_queued_seconds`` {task}: from the Ingress's hand-over to the Preprocessor's start (Serve's
  routing and the Preprocessor replicas' queues);
- ``kosmos_request_prepare_seconds`` {task}: the Preprocessor's work before generation (image fetch, decode,
  resize, prompt);
- ``kosmos_time_to_first_token_seconds`` {task}: streamed requests, from the arrival to the first generated
  token reaching the Preprocessor;
- ``kosmos_generation_tokens_per_second`` {task}: completion tokens over the seconds awaiting the Generator
  (its queue, prefill and decoding);
- ``kosmos_tokens_total`` {kind: prompt|completion}.

Generator: ``kosmos_engine_waiting`` (queue depth), ``kosmos_engine_running`` (sequences in the batch),
``kosmos_engine_steps_total`` and ``kosmos_engine_generated_tokens_total``. Serve adds its own tags
(deployment, replica, application).
"""

from __future__ import annotations

from typing import Any

from ray.serve.metrics import Counter, Gauge, Histogram

from serve.engine.messages import EngineStats

LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0]
STAGE_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
RATE_BUCKETS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]


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
        self.stages = {
            name: Histogram(metric, description=description, boundaries=STAGE_BUCKETS, tag_keys=("task",))
            for name, metric, description in (
                ("queued_s", "kosmos_request_queued_seconds", "From the Ingress's hand-over to the Preprocessor"),
                ("prepare_s", "kosmos_request_prepare_seconds", "The Preprocessor's work before generation"),
                ("ttft_s", "kosmos_time_to_first_token_seconds", "Streamed requests: arrival to the first token"),
            )
        }
        self.rate = Histogram(
            "kosmos_generation_tokens_per_second",
            description="Completion tokens over the seconds awaiting the Generator",
            boundaries=RATE_BUCKETS,
            tag_keys=("task",),
        )
        self.tokens = Counter("kosmos_tokens_total", description="Tokens in answered requests", tag_keys=("kind",))

    def observe(self, record: dict[str, Any]) -> None:
        task = record.get("task") or "none"
        self.requests.inc(tags={"task": task, "status": str(record["status"]), "stream": str(record["stream"])})
        if record["status"] != 200:
            return
        tags = {"task": task}
        self.latency.observe(record["latency_s"], tags=tags)
        for name, histogram in self.stages.items():
            if record.get(name) is not None:
                histogram.observe(record[name], tags=tags)
        completion, generate_s = record.get("completion_tokens", 0), record.get("generate_s", 0)
        if completion and generate_s:
            self.rate.observe(completion / generate_s, tags=tags)
        self.tokens.inc(record.get("prompt_tokens", 0), tags={"kind": "prompt"})
        self.tokens.inc(completion, tags={"kind": "completion"})


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

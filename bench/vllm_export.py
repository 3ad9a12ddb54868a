"""A load run's points in the result format of vLLM's ``bench serve``, so that tooling written for it reads them.

``vllm bench serve --save-result --append-result`` writes one JSON object a line, one line a run; a bench run
writes ``vllm_bench_serve.jsonl`` the same way, one line per load point, with vLLM's field names: the setup
(``date``, ``backend``, ``label``, ``model_id``, ``num_prompts``, ``request_rate``, ``burstiness``,
``max_concurrency``), the totals (``duration``, ``completed``, ``failed``, ``total_input_tokens``,
``total_output_tokens``), the rates (``request_throughput``, ``request_goodput``, ``output_throughput``,
``total_token_throughput``) and each latency metric's ``mean_``, ``median_``, ``std_`` and ``pNN_`` fields in
milliseconds (``bench.latency``; TTFT, TPOT and ITL only for a streamed run).

The mapping onto a bench point: ``duration`` is the steady window, ``completed`` the successful requests that
ended in it (so ``request_throughput`` = ``completed`` / ``duration`` = ``images_per_s``), the token totals are
theirs, ``num_prompts`` and ``failed`` count the steady requests sent and failed; a closed loop's
``request_rate`` is ``"inf"`` with ``max_concurrency`` its concurrency, an open loop's ``max_concurrency`` is
its in-flight cap. The per-request lists vLLM writes with ``--save-detailed`` are in ``requests.jsonl``.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.latency import METRICS, STREAMED_METRICS

BACKEND = "openai-chat"
"""vLLM's name for an OpenAI-compatible chat completions endpoint, which this service is."""

FILE_NAME = "vllm_bench_serve.jsonl"


def bench_serve_results(summary: dict[str, Any]) -> list[dict[str, Any]]:
    """One vLLM ``bench serve`` result per load point of a run's summary."""
    config = summary.get("config", {})
    load = config.get("load", {})
    model = config.get("model")
    started = summary.get("started_at")
    date = datetime.fromisoformat(started).strftime("%Y%m%d-%H%M%S") if started else None
    results = []
    for point in summary["points"]:
        window = point["window_s"]
        completed = round(point["images_per_s"] * window)
        tokens_in = round(point.get("input_tokens_per_s", 0.0) * window)
        tokens_out = round(point["output_tokens_per_s"] * window)
        closed = point["mode"] == "closed"
        result: dict[str, Any] = {
            "date": date,
            "endpoint_type": BACKEND,
            "backend": BACKEND,
            "label": point["label"],
            "model_id": model,
            "tokenizer_id": model,
            "num_prompts": point["requests"],
            "request_rate": "inf" if closed else point.get("rate"),
            "burstiness": load.get("burstiness", 1.0),
            "max_concurrency": point.get("concurrency") if closed else load.get("max_in_flight"),
            "duration": window,
            "completed": completed,
            "failed": point["errors"],
            "total_input_tokens": tokens_in,
            "total_output_tokens": tokens_out,
            "request_throughput": completed / window,
            "request_goodput": point.get("request_goodput"),
            "output_throughput": tokens_out / window,
            "total_token_throughput": (tokens_in + tokens_out) / window,
        }
        streamed = point.get("mean_ttft_ms") is not None
        for metric in METRICS:
            if metric in STREAMED_METRICS and not streamed:
                continue
            result |= {k: v for k, v in point.items() if k.endswith(f"_{metric}_ms")}
        results.append(result)
    return results


def write_bench_serve(out_dir: Path, summary: dict[str, Any]) -> Path:
    """``vllm_bench_serve.jsonl`` in ``out_dir``: one result a line."""
    path = Path(out_dir) / FILE_NAME
    path.write_text("".join(json.dumps(result) + "\n" for result in bench_serve_results(summary)))
    return path

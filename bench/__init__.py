"""Benchmarks of the Kosmos-2 service: throughput, latency and dollars per 1,000 images.

``python -m bench run`` loads the running service (closed loop, open loop or a rate shape), ``engine`` measures
the engine alone, ``preprocess`` the CPU image paths against the Hugging Face processor, ``price`` turns runs
on several instance types into a pricing estimate, ``report`` remakes a run's report from its files, and
``demo`` (``make bench``) serves the tiny model in-process for a short ``run`` (``bench/__main__.py`` shows the
command lines).

Every output folder (``--out DIR``) holds a ``summary.json`` that starts with ``schema_version``, ``config``,
``git_commit``, ``versions`` and ``hardware`` (``serve.provenance``), then the results in ``points``:

- ``run``: ``requests.jsonl`` (one ``bench.records.RequestRecord`` per request), ``replicas.jsonl`` (Serve's
  replica counts over time, with ``--serve-api``), ``summary.json``, ``summary.csv``, ``vllm_bench_serve.jsonl``
  (each point in the result format of vLLM's ``bench serve``), ``report.md`` and the plots
  ``throughput_latency.png``, ``latency_cdf.png``, ``timeseries.png`` and ``cost_vs_latency.png``;
- ``engine``: ``batches.jsonl`` (every timed batch), ``summary.json``, ``summary.csv``, ``report.md`` and
  ``engine_throughput.png``;
- ``preprocess``: ``summary.json`` (``paths``: ``hf``, ``ours_exact`` and ``ours_fast``, each with its
  ``images_per_s_per_core`` and ``speedup_vs_hf``; the fast path with its pixel deviation from the exact one)
  and ``report.md``;
- ``price``: ``report.md``, ``pricing.csv``, ``tasks.csv``, ``pricing.png`` and ``break_even.png``.

Modules: ``cli`` (the parser) and ``commands`` (what each command does); ``workload`` (what is sent),
``schedule`` (when: arrivals and load points), ``generator`` (one process sending them), ``load`` (a run, in
one process or several), ``replicas`` (Serve's replica counts), ``records`` (per-request records, result files),
``metrics`` and ``latency`` (pure statistics; TTFT, TPOT, ITL, E2EL and goodput), ``vllm_export`` (vLLM's result
format), ``cost`` (the price table and the cost formula), ``summary`` (a run's summary), ``pricing`` and
``task_cost`` (figures priced on instances, per task), ``tables`` (Markdown tables), ``report``,
``engine_report`` and ``price_report`` (the reports), ``plots`` (matplotlib), ``engine_bench``,
``engine_loops`` and ``preprocess_bench`` (the offline modes), ``demo`` (the tiny service for ``make bench``).
``bench.lab`` holds the tools that measure the engine and the service for their development (the performance
run, the engine profile, kernel comparisons), each its own command line.
"""

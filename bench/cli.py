"""Command line of the bench: load runs, engine-only and preprocessing runs, pricing, and reports.

The parser of ``python -m bench``: its commands, their options and defaults (``bench.commands`` runs them).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, fields
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from bench.cost import DEFAULT_PRICES
from bench.demo import TINY
from bench.latency import DEFAULT_PERCENTILES, parse_percentiles
from bench.schedule import LoadConfig
from bench.task_cost import DEFAULT_TASK_LENGTHS
from bench.workload import TASKS, WorkloadConfig, parse_mix

DEFAULT_CONCURRENCY = "1,4,16"
"""The concurrency sweep of ``run`` when no --concurrency, --rate or --shape is given."""

DEFAULT_UTILIZATION = 0.5
"""The "realistic" utilization a run reports beside 100%: paid hours that carry load (fleets idle at night)."""

DEFAULT_UTILIZATIONS = (0.3, 0.5, 0.7, 1.0)
"""The utilizations the pricing estimate prices at."""

DEFAULT_CPU_INSTANCE = "m7g.large"
"""The price table's CPU row the pricing estimate prices missing CPU cores at."""

DEFAULT_MARGIN = 0.3
"""Gross margin of the suggested list price."""

NO_PROGRESS = "no progress bars (they go to stderr)"


def float_list(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _mix_text(mix: dict[str, float]) -> str:
    return ",".join(f"{k}:{v:g}" for k, v in mix.items())


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    default = WorkloadConfig()
    group = parser.add_argument_group("workload")
    group.add_argument(
        "--source", help=f"synthetic, photos (bundled photographs) or a folder of images (default {default.source})"
    )
    group.add_argument(
        "--resolutions", type=parse_mix, help=f"WxH:weight,... (default {_mix_text(default.resolutions)})"
    )
    group.add_argument("--formats", type=parse_mix, help=f"jpeg/png:weight,... (default {_mix_text(default.formats)})")
    group.add_argument(
        "--tasks", type=parse_mix, help=f"{'/'.join(TASKS)}:weight,... (default {_mix_text(default.tasks)})"
    )
    group.add_argument("--max-tokens", type=int, help=f"new tokens at most per request (default {default.max_tokens})")
    group.add_argument(
        "--ignore-eos", action="store_true", default=None, help="exactly --max-tokens new tokens (fixed-length runs)"
    )
    group.add_argument(
        "--seed", type=int, help=f"makes the workload and the arrivals reproducible (default {default.seed})"
    )
    group.add_argument("--pool-size", type=int, help=f"distinct requests, cycled (default {default.pool_size})")


def given_fields(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The options given on the command line that are fields of ``config`` (the rest keep its defaults)."""
    names = {f.name for f in fields(config)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names and v is not None}


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(**given_fields(args, WorkloadConfig))


def add_pricing_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("cost")
    group.add_argument(
        "--nodes",
        help="the measured node set, NAME[/gpu][*COUNT],... from the price table, "
        "e.g. g5.xlarge or 'p5en.48xlarge/gpu,m7g.large*4'; omitted: not priced",
    )
    group.add_argument("--prices", type=Path, default=DEFAULT_PRICES, help="price table (default %(default)s)")
    group.add_argument(
        "--utilization",
        type=float,
        default=DEFAULT_UTILIZATION,
        help="realistic utilization reported beside 100%% (default %(default)s)",
    )


API_KEY_ENV = "KOSMOS_API_KEY"
"""Where ``run`` reads the service's API key (the command line never carries it)."""


def package_version() -> str:
    try:
        return version("kosmos2-serve")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    name = Path(sys.argv[0]).name
    prog = "python -m bench" if name in ("__main__.py", "-c", "") else name
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser(
        "run", help="measure the running service under load", epilog=f"The API key, if needed: ${API_KEY_ENV}."
    )
    run.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
    run.add_argument("--out", type=Path, required=True, help="output folder")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int_list, help=f"closed-loop sweep (default {DEFAULT_CONCURRENCY})")
    mode.add_argument("--rate", type=float_list, help="open-loop sweep of offered rates, requests/s")
    mode.add_argument("--shape", help="a rate shape RATE:SECONDS[,FROM-TO:SECONDS...] for autoscaling runs")
    load = run.add_argument_group("load")
    defaults = asdict(LoadConfig())
    load.add_argument(
        "--duration",
        type=float,
        dest="duration_s",
        metavar="S",
        help=f"steady seconds per point ({defaults['duration_s']})",
    )
    load.add_argument(
        "--warmup",
        "--warmup-s",
        type=float,
        dest="warmup_s",
        metavar="S",
        help=f"warm-up seconds per point ({defaults['warmup_s']})",
    )
    load.add_argument("--warmup-requests", type=int, help=f"warm-up requests per point ({defaults['warmup_requests']})")
    load.add_argument(
        "--grace",
        type=float,
        dest="grace_s",
        metavar="S",
        help=f"seconds to drain after a point ({defaults['grace_s']})",
    )
    load.add_argument(
        "--timeout", type=float, dest="timeout_s", metavar="S", help=f"request deadline, s ({defaults['timeout_s']})"
    )
    load.add_argument(
        "--burstiness", type=float, help=f"gamma shape of open-loop gaps, 1 = Poisson ({defaults['burstiness']})"
    )
    load.add_argument("--max-in-flight", type=int, help=f"open-loop in-flight cap ({defaults['max_in_flight']})")
    load.add_argument("--stream", action="store_true", default=None, help="stream answers; measures TTFT, TPOT and ITL")
    load.add_argument(
        "--ready-timeout",
        type=float,
        dest="ready_timeout_s",
        metavar="S",
        help=f"wait this long for /health first ({defaults['ready_timeout_s']})",
    )
    load.add_argument("--slo-p99", type=float, help="latency SLO in seconds: goodput and the SLO verdict")
    load.add_argument(
        "--percentiles",
        type=parse_percentiles,
        default=DEFAULT_PERCENTILES,
        help="latency percentiles to report, e.g. 50,90,99,99.9 (%(default)s)",
    )
    load.add_argument(
        "--goodput",
        nargs="+",
        metavar="KEY:MS",
        help="SLOs in milliseconds a request must all meet to count as good, as vLLM's --goodput: "
        "ttft:500 tpot:50 e2el:2000 (ttft and tpot need --stream)",
    )
    load.add_argument("--serve-api", help="Ray dashboard URL to poll replica counts from, e.g. http://127.0.0.1:8265")
    load.add_argument(
        "--serve-api-token-file",
        type=Path,
        help="Ray auth token file (default: found as Ray finds it: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, "
        "~/.ray/auth_token)",
    )
    load.add_argument("--poll-interval", type=float, default=1.0, help="seconds between replica polls (%(default)s)")
    load.add_argument("--engine-baseline", type=Path, help="an engine-only run folder, for the service/engine ratio")
    load.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    load.add_argument(
        "--processes",
        type=int,
        default=1,
        help="sending processes, each a share of every point (%(default)s); one tops out at a few hundred requests/s",
    )
    add_workload_args(run)
    add_pricing_args(run)

    engine = commands.add_parser("engine", help="measure the engine alone, without HTTP or Ray")
    engine.add_argument("--model", required=True, help="Hugging Face id or folder")
    engine.add_argument("--out", type=Path, required=True, help="output folder")
    engine.add_argument(
        "--engine",
        dest="engines",
        type=name_list,
        help="paths side by side: hf,fast,fast-eager,fast-sdpa,fast-sync,fast-graphs32,pixels (hf)",
    )
    engine.add_argument("--batch-sizes", type=int_list, help="comma-separated (1,8,32)")
    engine.add_argument("--iterations", type=int, help="timed batches per point (5)")
    engine.add_argument("--warmup-iterations", type=int, help="untimed batches first (1)")
    engine.add_argument(
        "--concurrency",
        type=int_list,
        help="closed loops at the engine: requests kept in it, running or waiting (none)",
    )
    engine.add_argument(
        "--rates", type=float_list, help="open loops at the engine: Poisson arrivals, requests/s (none)"
    )
    engine.add_argument(
        "--duration",
        "--seconds",
        type=float,
        dest="duration_s",
        metavar="S",
        help="timed seconds of each closed or open loop (10)",
    )
    engine.add_argument(
        "--output-lengths",
        type=int_list,
        help="measure every point at each of these exact numbers of new tokens (ignore_eos), e.g. 16,32,64,128; "
        "default: the workload's --max-tokens",
    )
    engine.add_argument("--load-format", choices=["auto", "dummy"], help="dummy: random weights (auto)")
    engine.add_argument("--dtype", help="auto, float32, float16, bfloat16 (auto)")
    engine.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (auto)")
    engine.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)
    add_workload_args(engine)
    add_pricing_args(engine)

    pre = commands.add_parser(
        "preprocess", help="images/s per core: our exact and fast image paths against the HF processor"
    )
    pre.add_argument("--out", type=Path, required=True, help="output folder")
    pre.add_argument("--model", help="model folder whose processor to use (default: the tiny model's)")
    pre.add_argument("--images", type=int, help="distinct JPEGs (32)")
    pre.add_argument("--resolution", help="WxH (640x480)")
    pre.add_argument(
        "--duration",
        "--seconds",
        type=float,
        dest="duration_s",
        metavar="S",
        help="timed CPU seconds per path at least (3)",
    )
    pre.add_argument("--seed", type=int, help="(0)")
    pre.add_argument("--no-progress", action="store_true", help=NO_PROGRESS)

    price = commands.add_parser("price", help="a pricing estimate from one or more runs")
    price.add_argument("run_dirs", nargs="+", type=Path, help="bench output folders (run or engine)")
    price.add_argument("--out", type=Path, required=True, help="output folder")
    price.add_argument(
        "--utilization",
        type=float_list,
        default=",".join(f"{u:g}" for u in DEFAULT_UTILIZATIONS),
        help="utilizations to price at, comma-separated (%(default)s)",
    )
    price.add_argument(
        "--margin", type=float, default=DEFAULT_MARGIN, help="gross margin of the list price (%(default)s)"
    )
    price.add_argument("--slo-p99", type=float, help="price only service points whose p99 latency is within this, s")
    price.add_argument("--max-error-rate", type=float, default=0.01, help="price only points below (%(default)s)")
    price.add_argument(
        "--nodes",
        action="append",
        default=[],
        metavar="RUN_DIR=SPEC",
        help="price a run on this node set as given instead of every instance of its GPU; repeatable",
    )
    price.add_argument("--prices", type=Path, default=DEFAULT_PRICES, help="price table (default %(default)s)")
    price.add_argument(
        "--lengths", type=Path, default=DEFAULT_TASK_LENGTHS, help="answer lengths per task (default %(default)s)"
    )
    price.add_argument(
        "--cpu-ms-per-request",
        type=float,
        help="the service's CPU ms a request (default: cpu_per_request.json in or above each service run, "
        "the load generator left out; a batch run's summary holds its own)",
    )
    price.add_argument(
        "--cpu-instance",
        default=DEFAULT_CPU_INSTANCE,
        help="price table row whose price a vCPU prices the CPU tier's missing cores (%(default)s)",
    )

    report = commands.add_parser(
        "report", help="make a run folder's report and plots again from its files (or a batch run's, priced)"
    )
    report.add_argument("run_dir", type=Path)
    report.add_argument("--engine-baseline", type=Path)
    report.add_argument("--nodes", help="a batch run's node set to price it on, as bench run's --nodes")
    report.add_argument("--utilization", type=float, default=1.0, help="a batch run's utilization (%(default)s)")

    demo = commands.add_parser("demo", help="serve the tiny model here, run a short closed-loop sweep, stop")
    demo.add_argument("--out", type=Path, required=True, help="output folder")
    demo.add_argument("--model", type=Path, default=TINY, help="tiny model folder, built if empty (%(default)s)")
    demo.add_argument("--port", type=int, default=0, help="the service's port on 127.0.0.1 (default: a free one)")
    demo.add_argument("--concurrency", default="1,4", help="closed-loop sweep (%(default)s)")
    demo.add_argument("--duration", default="5", help="steady seconds per point (%(default)s)")
    demo.add_argument("--nodes", default="m7g.large", help="node set to price the run on (%(default)s)")
    return parser

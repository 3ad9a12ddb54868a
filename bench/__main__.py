"""Command line of the bench: load runs, engine-only and preprocessing runs, pricing, and reports.

    python -m bench run --url http://127.0.0.1:8000 --duration 30 --concurrency 1,4,16 --nodes g5.xlarge --out DIR
    python -m bench run --url URL --rate 2,4,8 [--burstiness 0.5] --out DIR
    python -m bench run --url URL --shape 2:60,2-20:120,20:60,2:60 --serve-api http://127.0.0.1:8265 --out DIR
    python -m bench engine --model M --engine hf,fast --batch-sizes 1,8,32 [--load-format dummy] --out DIR
    python -m bench preprocess --out DIR
    python -m bench price RUN_DIR [RUN_DIR ...] --margin 0.3 --utilization 0.5 --out DIR
    python -m bench report RUN_DIR [--engine-baseline ENGINE_DIR]
    python -m bench demo --out out/bench     # make bench: the tiny model served here, a short run, a clean stop

Every command writes its files under ``--out`` (see ``bench/__init__.py`` for the layout) and prints a short
table. ``python -m bench COMMAND --help`` lists each command's options with their defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from bench.cost import DEFAULT_PRICES, load_prices, parse_nodes
from bench.demo import TINY
from bench.workload import TASKS, WorkloadConfig, parse_mix

DEFAULT_CONCURRENCY = "1,4,16"
"""The concurrency sweep of ``run`` when no --concurrency, --rate or --shape is given."""

DEFAULT_UTILIZATION = 0.5
"""The "realistic" utilization reported beside 100%: paid hours that carry load (fleets idle at night)."""

DEFAULT_MARGIN = 0.3
"""Gross margin of the suggested list price."""


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _mix_text(mix: dict[str, float]) -> str:
    return ",".join(f"{k}:{v:g}" for k, v in mix.items())


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    default = WorkloadConfig()
    group = parser.add_argument_group("workload")
    group.add_argument(
        "--source", help=f"synthetic, skimage (bundled photographs) or a folder of images (default {default.source})"
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


def _given(args: argparse.Namespace, config: type) -> dict[str, Any]:
    """The options given on the command line that are fields of ``config`` (the rest keep its defaults)."""
    names = {f.name for f in fields(config)}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names and v is not None}


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    return WorkloadConfig(**_given(args, WorkloadConfig))


def add_pricing_args(parser: argparse.ArgumentParser, nodes: bool = True) -> None:
    group = parser.add_argument_group("cost")
    if nodes:
        group.add_argument(
            "--nodes",
            help="the measured node set, NAME[/gpu][*COUNT],... from the price table, "
            "e.g. g5.xlarge or 'p5.48xlarge/gpu,c7i.2xlarge*2'; omitted: not priced",
        )
    group.add_argument("--prices", type=Path, default=DEFAULT_PRICES, help="price table (default %(default)s)")
    group.add_argument(
        "--utilization",
        type=float,
        default=DEFAULT_UTILIZATION,
        help="realistic utilization reported beside 100%% (default %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="measure the running service under load")
    run.add_argument("--url", required=True, help="the service, e.g. http://127.0.0.1:8000")
    run.add_argument("--out", type=Path, required=True, help="output folder")
    mode = run.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=_ints, help=f"closed-loop sweep (default {DEFAULT_CONCURRENCY})")
    mode.add_argument("--rate", type=_floats, help="open-loop sweep of offered rates, requests/s")
    mode.add_argument("--shape", help="a rate shape RATE:SECONDS[,FROM-TO:SECONDS...] for autoscaling runs")
    load = run.add_argument_group("load")
    defaults = _load_defaults()
    load.add_argument(
        "--duration",
        type=float,
        dest="duration_s",
        metavar="S",
        help=f"steady seconds per point ({defaults['duration_s']})",
    )
    load.add_argument(
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
    load.add_argument("--stream", action="store_true", default=None, help="stream answers; measures TTFT and ITL")
    load.add_argument(
        "--ready-timeout",
        type=float,
        dest="ready_timeout_s",
        metavar="S",
        help=f"wait this long for /health first ({defaults['ready_timeout_s']})",
    )
    load.add_argument("--slo-p99", type=float, help="latency SLO in seconds: goodput and the SLO verdict")
    load.add_argument("--api-key-env", help="environment variable holding the service's API key")
    load.add_argument("--serve-api", help="Ray dashboard URL to poll replica counts from, e.g. http://127.0.0.1:8265")
    load.add_argument(
        "--serve-api-token-file",
        type=Path,
        help="Ray auth token file (default: found as Ray finds it: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, "
        "~/.ray/auth_token)",
    )
    load.add_argument("--poll-interval", type=float, default=1.0, help="seconds between replica polls (%(default)s)")
    load.add_argument("--engine-baseline", type=Path, help="an engine-only run folder, for the service/engine ratio")
    load.add_argument("--no-progress", action="store_true", help="no progress bar")
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
        type=_names,
        help="paths side by side: hf,fast,fast-eager,fast-sdpa,fast-sync,fast-graphs32 (hf)",
    )
    engine.add_argument("--batch-sizes", type=_ints, help="comma-separated (1,8,32)")
    engine.add_argument("--iterations", type=int, help="timed batches per point (5)")
    engine.add_argument("--warmup-iterations", type=int, help="untimed batches first (1)")
    engine.add_argument(
        "--concurrency", type=_ints, help="closed loops at the engine: requests kept in it, running or waiting (none)"
    )
    engine.add_argument("--rates", type=_floats, help="open loops at the engine: Poisson arrivals, requests/s (none)")
    engine.add_argument("--seconds", type=float, help="timed seconds of each closed or open loop (10)")
    engine.add_argument("--load-format", choices=["auto", "dummy"], help="dummy: random weights (auto)")
    engine.add_argument("--dtype", help="auto, float32, float16, bfloat16 (auto)")
    engine.add_argument("--device", help="auto, cpu, cuda, cuda:1 ... (auto)")
    add_workload_args(engine)
    add_pricing_args(engine)

    pre = commands.add_parser(
        "preprocess", help="images/s per core: our exact and fast image paths against the HF processor"
    )
    pre.add_argument("--out", type=Path, required=True, help="output folder")
    pre.add_argument("--model", help="model folder whose processor to use (default: the tiny model's)")
    pre.add_argument("--images", type=int, help="distinct JPEGs (32)")
    pre.add_argument("--resolution", help="WxH (640x480)")
    pre.add_argument("--seconds", type=float, help="timed seconds per path at least (3)")
    pre.add_argument("--seed", type=int, help="(0)")

    price = commands.add_parser("price", help="a pricing estimate from one or more runs")
    price.add_argument("run_dirs", nargs="+", type=Path, help="bench output folders (run or engine)")
    price.add_argument("--out", type=Path, required=True, help="output folder")
    price.add_argument("--margin", type=float, default=DEFAULT_MARGIN, help="gross margin (%(default)s)")
    price.add_argument("--slo-p99", type=float, help="price only points whose p99 latency is within this, s")
    price.add_argument("--max-error-rate", type=float, default=0.01, help="price only points below (%(default)s)")
    price.add_argument(
        "--nodes",
        action="append",
        default=[],
        metavar="RUN_DIR=SPEC",
        help="node set of a run that recorded none (or to override it); repeatable",
    )
    add_pricing_args(price, nodes=False)

    report = commands.add_parser("report", help="make a run folder's report and plots again from its files")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--engine-baseline", type=Path)

    demo = commands.add_parser("demo", help="serve the tiny model here, run a short closed-loop sweep, stop")
    demo.add_argument("--out", type=Path, required=True, help="output folder")
    demo.add_argument("--model", type=Path, default=TINY, help="tiny model folder, built if empty (%(default)s)")
    demo.add_argument("--port", type=int, default=0, help="the service's port on 127.0.0.1 (default: a free one)")
    demo.add_argument("--concurrency", default="1,4", help="closed-loop sweep (%(default)s)")
    demo.add_argument("--duration", default="5", help="steady seconds per point (%(default)s)")
    demo.add_argument("--nodes", default="c7i.2xlarge", help="node set to price the run on (%(default)s)")
    return parser


def _load_defaults() -> dict[str, Any]:
    from bench.load import LoadConfig

    return asdict(LoadConfig())


def serve_api_token(path: Path | None) -> str | None:
    """The Ray auth token for the dashboard: from ``path`` if given, else where Ray's clients find it."""
    from bench.replicas import ray_auth_token

    return path.expanduser().read_text().strip() if path else ray_auth_token()


def command_run(args: argparse.Namespace) -> int:
    from bench.load import LoadConfig, run_load, sweep
    from bench.records import write_json, write_jsonl
    from bench.report import console_table, write_run_report
    from bench.summary import service_summary
    from bench.workload import build_workload

    load_config = LoadConfig(**_given(args, LoadConfig))
    workload = workload_config(args)
    concurrency = args.concurrency or ([] if args.rate or args.shape else _ints(DEFAULT_CONCURRENCY))
    points = sweep(concurrency, args.rate or [], args.shape)
    load_config.check(points)
    prices = load_prices(args.prices)
    nodes = parse_nodes(args.nodes) if args.nodes else []
    prices.usd_per_hour(nodes)  # an unknown instance fails now, not after the run
    if args.api_key_env and args.api_key_env not in os.environ:
        raise ValueError(f"--api-key-env names {args.api_key_env}, which is not set")
    api_key = os.environ[args.api_key_env] if args.api_key_env else None
    token = serve_api_token(args.serve_api_token_file) if args.serve_api else None
    run = asyncio.run(
        run_load(
            args.url,
            points,
            build_workload(workload),
            load_config,
            api_key=api_key,
            serve_api=args.serve_api,
            serve_api_token=token,
            poll_interval_s=args.poll_interval,
            progress=not args.no_progress,
            processes=args.processes,
        )
    )
    config = {
        "command": "run",
        "url": args.url,
        "points": [p.label for p in points],
        "shape": args.shape,
        "load": asdict(load_config),
        "workload": workload.to_dict(),
        "slo_p99_s": args.slo_p99,
        "serve_api": args.serve_api,
        "poll_interval_s": args.poll_interval,
    }
    summary = service_summary(run, config, prices, nodes, args.utilization, args.slo_p99)
    args.out.mkdir(parents=True, exist_ok=True)
    write_jsonl(args.out / "requests.jsonl", run.records)
    write_jsonl(args.out / "replicas.jsonl", run.replicas)
    write_json(args.out / "summary.json", summary)
    report = write_run_report(args.out, args.engine_baseline)
    print(console_table(summary))
    print(f"wrote {report}")
    return 0


def command_engine(args: argparse.Namespace) -> int:
    from bench.engine_bench import EngineBenchConfig, run_engine_bench
    from bench.report import write_engine_report

    config = EngineBenchConfig(**_given(args, EngineBenchConfig), workload=workload_config(args))
    prices = load_prices(args.prices)
    nodes = parse_nodes(args.nodes) if args.nodes else []
    prices.usd_per_hour(nodes)  # an unknown instance name fails here, before minutes of measuring
    summary = run_engine_bench(config, args.out, prices, nodes, args.utilization)
    report = write_engine_report(args.out)
    for point in summary["points"]:
        print(
            f"{point['path']:>5} batch {point['batch_size']:>4}: {point['images_per_s']:8.2f} images/s, "
            f"{point['latency_s']:7.3f} s/batch, {point['tokens_per_s']:9.1f} tokens/s"
        )
    for point in summary["continuous"]:
        print(
            f"{point['path']:>5} {point['concurrency']:>4} in flight: {point['images_per_s']:8.2f} images/s, "
            f"p50 {point['latency_p50_s']:7.3f} s, mean batch {point['mean_batch']:6.1f}"
        )
    for point in summary["open"]:
        print(
            f"{point['path']:>5} {point['rate']:6.1f} arriving/s: {point['images_per_s']:8.2f} images/s, "
            f"p50 {point['latency_p50_s']:7.3f} s, p99 {point['latency_p99_s']:7.3f} s, "
            f"mean batch {point['mean_batch']:6.1f}, {point['waiting_at_end']} waiting at the end"
        )
    print(f"wrote {report}")
    return 0


def command_preprocess(args: argparse.Namespace) -> int:
    from bench.preprocess_bench import PreprocessBenchConfig, run_preprocess_bench
    from bench.report import write_preprocess_report

    config = PreprocessBenchConfig(**_given(args, PreprocessBenchConfig))
    summary = run_preprocess_bench(config, args.out)
    report = write_preprocess_report(args.out)
    for name, values in summary["paths"].items():
        deviation = (
            f", pixels {values['pixel_mean_abs_diff']:.2f} mean / {values['pixel_max_abs_diff']:.0f} max levels off"
            if "pixel_mean_abs_diff" in values
            else ""
        )
        print(
            f"{name:>10}: {values['images_per_s_per_core']:8.1f} images/s per core, "
            f"{values['speedup_vs_hf']:.2f}x hf{deviation}"
        )
    print(f"wrote {report}")
    return 0


def command_price(args: argparse.Namespace) -> int:
    from bench.pricing import price_row
    from bench.records import read_json
    from bench.report import write_price_report

    overrides = {}
    for item in args.nodes:
        folder, sep, spec = item.partition("=")
        if not sep:
            raise ValueError(f"--nodes takes RUN_DIR=SPEC, got {item!r}")
        overrides[Path(folder).resolve()] = spec
    prices = load_prices(args.prices)
    names = [d.name for d in args.run_dirs]
    rows, summaries = [], {}
    for folder in args.run_dirs:
        name = folder.name if names.count(folder.name) == 1 else str(folder)
        summaries[name] = read_json(folder / "summary.json")
        rows.append(
            price_row(
                name,
                summaries[name],
                prices,
                nodes=overrides.get(folder.resolve()),
                utilization=args.utilization,
                margin=args.margin,
                slo_p99_s=args.slo_p99,
                max_error_rate=args.max_error_rate,
            )
        )
    report = write_price_report(rows, summaries, args.out, args.slo_p99, args.max_error_rate)
    for row in rows:
        print(
            f"{row.run}: {row.nodes} {row.images_per_s:.3g} images/s -> ${_money(row.cost_per_1k_images_usd)}/1k "
            f"@100%, ${_money(row.cost_per_1k_images_usd_at_utilization)} @{row.utilization:.0%}, list "
            f"${_money(row.list_price_per_1k_images_usd)} (reference ${row.reference_usd_per_1k_images})"
        )
    print(f"wrote {report}")
    return 0


def command_demo(args: argparse.Namespace) -> int:
    """``run`` against the tiny model served in this process for the length of the run."""
    from bench.demo import tiny_service

    load_prices(DEFAULT_PRICES).usd_per_hour(parse_nodes(args.nodes))  # an unknown instance fails before the start
    with tiny_service(args.model, args.port) as url:
        run = ["run", "--url", url, "--out", str(args.out), "--concurrency", args.concurrency]
        run += ["--duration", args.duration, "--warmup-s", "1", "--max-tokens", "16", "--nodes", args.nodes]
        return command_run(build_parser().parse_args(run))


def _money(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def command_report(args: argparse.Namespace) -> int:
    from bench.records import read_json
    from bench.report import write_engine_report, write_preprocess_report, write_run_report

    writers = {"engine": write_engine_report, "preprocess": write_preprocess_report}
    kind = read_json(args.run_dir / "summary.json").get("kind")
    report = writers[kind](args.run_dir) if kind in writers else write_run_report(args.run_dir, args.engine_baseline)
    print(f"wrote {report}")
    return 0


COMMANDS = {
    "run": command_run,
    "engine": command_engine,
    "preprocess": command_preprocess,
    "price": command_price,
    "report": command_report,
    "demo": command_demo,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, TimeoutError, FileNotFoundError) as exc:
        print(f"python -m bench {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""What each command of ``python -m bench`` does, by name in :data:`COMMANDS` (``bench.cli`` parses them)."""

from __future__ import annotations

import argparse
import asyncio
import os
from dataclasses import asdict
from pathlib import Path

from bench.cli import API_KEY_ENV, DEFAULT_CONCURRENCY, build_parser, given_fields, int_list, workload_config
from bench.cost import DEFAULT_PRICES, load_prices, parse_nodes


def serve_api_token(path: Path | None) -> str | None:
    """The Ray auth token for the dashboard: from ``path`` if given, else where Ray's clients find it."""
    from bench.replicas import ray_auth_token

    return path.expanduser().read_text().strip() if path else ray_auth_token()


def command_run(args: argparse.Namespace) -> int:
    from bench.latency import parse_goodput
    from bench.load import run_load
    from bench.records import write_json, write_jsonl
    from bench.report import console_table, write_run_report
    from bench.schedule import LoadConfig, sweep
    from bench.summary import service_summary
    from bench.workload import build_workload

    load_config = LoadConfig(**given_fields(args, LoadConfig))
    workload = workload_config(args)
    concurrency = args.concurrency or ([] if args.rate or args.shape else int_list(DEFAULT_CONCURRENCY))
    points = sweep(concurrency, args.rate or [], args.shape)
    load_config.check(points)
    prices = load_prices(args.prices)
    nodes = parse_nodes(args.nodes) if args.nodes else []
    prices.usd_per_hour(nodes)  # an unknown instance fails now, not after the run
    goodput = parse_goodput(args.goodput or [])
    if {"ttft", "tpot"} & set(goodput) and not load_config.stream:
        raise ValueError("--goodput ttft and tpot need --stream: a whole answer has no first token time")
    api_key = os.environ.get(API_KEY_ENV) or None
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
        "model": run.model,
        "slo_p99_s": args.slo_p99,
        "percentiles": list(args.percentiles),
        "goodput_slos_ms": goodput or None,
        "serve_api": args.serve_api,
        "poll_interval_s": args.poll_interval,
    }
    summary = service_summary(
        run, config, prices, nodes, args.utilization, args.slo_p99, args.percentiles, goodput or None
    )
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
    from bench.engine_report import write_engine_report

    config = EngineBenchConfig(**given_fields(args, EngineBenchConfig), workload=workload_config(args))
    prices = load_prices(args.prices)
    nodes = parse_nodes(args.nodes) if args.nodes else []
    prices.usd_per_hour(nodes)  # an unknown instance name fails here, before minutes of measuring
    summary = run_engine_bench(config, args.out, prices, nodes, args.utilization, progress=not args.no_progress)
    report = write_engine_report(args.out)
    for point in summary["points"]:
        print(
            f"{point['path']:>5} {point['max_tokens']:>4} tokens, batch {point['batch_size']:>4}: "
            f"{point['images_per_s']:8.2f} images/s, {point['latency_s']:7.3f} s/batch, "
            f"{point['tokens_per_s']:9.1f} tokens/s"
        )
    for point in summary["continuous"]:
        print(
            f"{point['path']:>5} {point['max_tokens']:>4} tokens, {point['concurrency']:>4} in flight: "
            f"{point['images_per_s']:8.2f} images/s, p50 {_seconds(point['latency_p50_s'])}, "
            f"mean batch {point['mean_batch']:6.1f}"
        )
    for point in summary["open"]:
        print(
            f"{point['path']:>5} {point['max_tokens']:>4} tokens, {point['rate']:6.1f} arriving/s: "
            f"{point['images_per_s']:8.2f} images/s, p50 {_seconds(point['latency_p50_s'])}, "
            f"p99 {_seconds(point['latency_p99_s'])}, mean batch {point['mean_batch']:6.1f}, "
            f"{point['waiting_at_end']} waiting at the end"
        )
    print(f"wrote {report}")
    return 0


def command_preprocess(args: argparse.Namespace) -> int:
    from bench.engine_report import write_preprocess_report
    from bench.preprocess_bench import PreprocessBenchConfig, run_preprocess_bench

    config = PreprocessBenchConfig(**given_fields(args, PreprocessBenchConfig))
    summary = run_preprocess_bench(config, args.out, progress=not args.no_progress)
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
    from bench.price_report import PriceSettings, write_price_report
    from bench.pricing import Offer, figures_of, offers_for, price_row
    from bench.records import read_json
    from bench.task_cost import load_task_lengths

    overrides = {}
    for item in args.nodes:
        folder, sep, spec = item.partition("=")
        if not sep:
            raise ValueError(f"--nodes takes RUN_DIR=SPEC, got {item!r}")
        overrides[Path(folder).resolve()] = spec
    if not args.utilization or not all(0 < u <= 1 for u in args.utilization):
        raise ValueError(f"--utilization takes fractions in (0, 1], e.g. 0.3,0.5,0.7,1; got {args.utilization}")
    prices = load_prices(args.prices)
    lengths = load_task_lengths(args.lengths)
    cpu = prices.price(args.cpu_instance)
    if not cpu.vcpus:
        raise ValueError(f"--cpu-instance {args.cpu_instance} has no vCPUs in the price table")
    names = [d.name for d in args.run_dirs]
    usd_per_vcpu_hour = cpu.instance_usd_per_hour / cpu.vcpus
    rows, figures = [], []
    for folder in args.run_dirs:
        name = folder.name if names.count(folder.name) == 1 else str(folder)
        summary = read_json(folder / "summary.json")
        cpu_ms = args.cpu_ms_per_request if args.cpu_ms_per_request is not None else service_cpu_ms(folder)
        found = figures_of(name, summary, cpu_ms, args.slo_p99, args.max_error_rate)
        if not found:
            raise ValueError(f"{folder}: no point to price (none within the error rate and the SLO)")
        spec = overrides.get(folder.resolve())
        offers = [Offer.node_set(spec, prices)] if spec else offers_for(found[0].gpu, prices)
        if not offers:
            raise ValueError(
                f"{folder}: no price for its GPU ({found[0].gpu}) in {args.prices}; pass --nodes {folder}=SPEC"
            )
        figures += found
        rows += [
            price_row(f, o, args.utilization, args.margin, prices.reference_usd_per_1k, usd_per_vcpu_hour)
            for f in found
            for o in offers
        ]
    settings = PriceSettings(
        tuple(args.utilization),
        args.margin,
        args.slo_p99,
        args.max_error_rate,
        args.cpu_instance,
        _shown(args.prices),
        _shown(args.lengths),
    )
    report = write_price_report(rows, figures, prices, lengths, settings, args.out)
    low = min(args.utilization)
    for row in rows:
        print(
            f"{row.figure.run} ({row.figure.kind}, {row.figure.new_tokens or '-'} tokens) on {row.offer.name} "
            f"({row.offer.pricing}): ${_money(row.cost_usd.get(1.0))}/1k @100%, "
            f"${_money(row.cost_usd[low])} @{low:.0%} (reference ${prices.reference_usd_per_1k})"
        )
    print(f"wrote {report}")
    return 0


def service_cpu_ms(folder: Path) -> float | None:
    """The service's CPU ms a request from ``cpu_per_request.json`` in ``folder`` or its parent (a performance
    run's layout), the load generator left out; None if there is none."""
    from bench.records import read_json

    for candidate in (folder / "cpu_per_request.json", folder.parent / "cpu_per_request.json"):
        if candidate.exists():
            spent = read_json(candidate)
            return round(spent["total"] - spent.get("load generator", 0.0), 3)
    return None


def _shown(path: Path) -> str:
    """A path as the report shows it: relative to the working directory when inside it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def command_demo(args: argparse.Namespace) -> int:
    """``run`` against the tiny model served in this process for the length of the run."""
    from bench.demo import tiny_service

    load_prices(DEFAULT_PRICES).usd_per_hour(parse_nodes(args.nodes))  # an unknown instance fails before the start
    with tiny_service(args.model, args.port) as url:
        run = ["run", "--url", url, "--out", str(args.out), "--concurrency", args.concurrency]
        run += ["--duration", args.duration, "--warmup", "1", "--max-tokens", "16", "--nodes", args.nodes]
        return command_run(build_parser().parse_args(run))


def _seconds(value: float | None) -> str:
    return "     – s" if value is None else f"{value:7.3f} s"


def _money(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def command_report(args: argparse.Namespace) -> int:
    from bench.batch_report import write_batch_report
    from bench.engine_report import write_engine_report, write_preprocess_report
    from bench.records import read_json
    from bench.report import write_run_report

    writers = {"engine": write_engine_report, "preprocess": write_preprocess_report}
    kind = read_json(args.run_dir / "summary.json").get("kind")
    if kind == "batch":
        report = write_batch_report(args.run_dir, args.nodes, args.utilization)
    elif kind in writers:
        report = writers[kind](args.run_dir)
    else:
        report = write_run_report(args.run_dir, args.engine_baseline)
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

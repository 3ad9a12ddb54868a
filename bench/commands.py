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
    from bench.engine_report import write_engine_report

    config = EngineBenchConfig(**given_fields(args, EngineBenchConfig), workload=workload_config(args))
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
    from bench.engine_report import write_preprocess_report
    from bench.preprocess_bench import PreprocessBenchConfig, run_preprocess_bench

    config = PreprocessBenchConfig(**given_fields(args, PreprocessBenchConfig))
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
    from bench.price_report import write_price_report
    from bench.pricing import price_row
    from bench.records import read_json

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
    from bench.engine_report import write_engine_report, write_preprocess_report
    from bench.records import read_json
    from bench.report import write_run_report

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

"""``kosmos2-serve batch`` (``python -m serve batch``): the command line of the batch mode.

    kosmos2-serve batch -i requests.jsonl -o results.jsonl [--config FILE]       # OpenAI's batch file format
    kosmos2-serve batch --images photos/ -o captions/ --task caption             # a folder of images to Parquet
    kosmos2-serve batch --images 's3://bucket/shots/*.jpg' -o grounded/ --task ground --text "the person"
    kosmos2-serve batch --images table.parquet -o answers/ --task vqa            # the table's rows: image, text

Run it again with the same output to resume: what is done is skipped. It starts a Ray of its own on this machine,
or joins the cluster ``RAY_ADDRESS`` names. Exit codes: 0 done (rows that failed say why in the output), 1 a
failure, 2 a usage error (bad options, an output that holds another run), 130 interrupted (rerun to resume).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from serve.kosmos2.tasks import Task

INTERRUPTED = 130
IMAGE_OPTIONS = (
    "task",
    "text",
    "region",
    "max_tokens",
    "ignore_eos",
    "temperature",
    "top_p",
    "seed",
    "no_repeat_ngram_size",
    "stop",
)
"""The chat request fields an images run gives every image (the table's own task, text and region win)."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    batch = commands.add_parser(
        "batch",
        help="run a batch file, or caption a folder of images, through the engine on Ray Data",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = batch.add_mutually_exclusive_group(required=True)
    what.add_argument("-i", "--input-file", help="an OpenAI batch file (JSONL of /v1/chat/completions requests)")
    what.add_argument("--images", help="a folder, a glob, or a Parquet or JSONL table with an image column")
    batch.add_argument(
        "-o", "--output", "--output-file", required=True, help="the output file (-i) or folder of Parquet (--images)"
    )
    batch.add_argument("--config", help="YAML: a ServiceConfig or a Serve config file (engine, limits, resources)")
    batch.add_argument("--model", help="Hugging Face id or local folder (default: the config's)")
    batch.add_argument("--engine", choices=["fast", "hf", "pixels"], help="generation engine (default fast)")
    batch.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    batch.add_argument("--load-format", choices=["auto", "dummy"], help="dummy: random weights, for benchmarks")
    images = batch.add_argument_group("images", "the request each image gets (--images only)")
    images.add_argument("--task", choices=[t.value for t in Task], help="default: caption")
    images.add_argument("--text", help="the question (vqa), the expression (ground) or the prompt (raw)")
    images.add_argument("--region", type=_region, help="describe_region's box: x1,y1,x2,y2 in [0, 1]")
    images.add_argument("--max-tokens", type=int, help="new tokens at most (default: the config's)")
    images.add_argument(
        "--ignore-eos", action="store_true", default=None, help="exactly --max-tokens new tokens (for benchmarks)"
    )
    images.add_argument("--temperature", type=float, help="0 (the default) is greedy")
    images.add_argument("--top-p", type=float)
    images.add_argument("--seed", type=int)
    images.add_argument("--no-repeat-ngram-size", type=int)
    images.add_argument("--stop", action="append", help="a stop string (repeatable, at most 4)")
    run = batch.add_argument_group("run")
    run.add_argument("--rows-per-file", type=int, default=1000, help="rows a part file holds at least (%(default)s)")
    run.add_argument(
        "--engines",
        type=int,
        help="engine actors, each with the Generator's resources, GPUs included: an autoscaling cluster adds the "
        "GPU nodes (default: one per GPU the cluster has, else one on the CPU)",
    )
    run.add_argument("--num-cpus", type=int, help="CPUs of the Ray this command starts (default: all)")
    run.add_argument("--summary", help="also write the run's summary.json to this file (for python -m bench price)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def _region(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",")]
    except ValueError:
        values = []
    if len(values) != 4:
        raise argparse.ArgumentTypeError("a region is four numbers: x1,y1,x2,y2")
    return values


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from serve.app.config import ConfigError, config_from_args
    from serve.batch.job import BatchError, BatchJob, run
    from serve.batch.sources import SourceError
    from serve.engine.model import ModelUnavailable, load_processor

    options = {name: getattr(args, name) for name in IMAGE_OPTIONS if getattr(args, name) is not None}
    if options and not args.images:
        parser.error(f"--{next(iter(options)).replace('_', '-')} goes with --images (a batch file's lines hold theirs)")
    if args.rows_per_file < 1 or (args.engines is not None and args.engines < 1):
        parser.error("--rows-per-file and --engines take a positive number")
    try:
        config = config_from_args(args)
    except (ConfigError, OSError) as exc:
        parser.error(str(exc))
    try:
        load_processor(config.model.source)
    except ModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    job = BatchJob(
        source=args.images or args.input_file,
        output=args.output,
        images=args.images is not None,
        options=options,
        rows_per_file=args.rows_per_file,
        engines=args.engines,
    )
    started = start_ray(args.num_cpus)
    try:
        summary = run(job, config, progress=not args.no_progress)
    except (BatchError, SourceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: the rows written are kept; run the same command again to resume {job.output}")
        return INTERRUPTED
    finally:
        if started:
            import ray

            ray.shutdown()
    if args.summary:
        os.makedirs(os.path.dirname(os.path.abspath(args.summary)), exist_ok=True)
        with open(args.summary, "w") as out:
            json.dump(summary, out, indent=2)
    point = summary["points"][0]
    print(
        f"{job.output}: {point['requests']} rows this run ({point['answered']} answers, {point['errors']} errors), "
        f"{point['skipped_done']} done before; {point['images_per_s']:.3g} images/s; summary in {job.state}"
    )
    return 0


def start_ray(num_cpus: int | None) -> bool:
    """Start a Ray of this command's own on this machine (or join ``RAY_ADDRESS``'s cluster), unless one is
    running in this process; returns whether it did."""
    import ray

    if ray.is_initialized():
        return False
    if "RAY_ADDRESS" in os.environ:
        ray.init()
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1")
    return True

"""Command line of the service (``kosmos2-serve``, or ``python -m serve``).

kosmos2-serve run --model microsoft/kosmos-2-patch14-224 [--host 127.0.0.1] [--port 8000] [--config FILE]
                  [--num-cpus N] [--drain-timeout SECONDS]
kosmos2-serve build [--config FILE] [-o FILE]   # the Serve config file (args and deployments:), as serve build
kosmos2-serve tiny DIR [--real-size]            # the tiny offline model (or the real architecture's config)
kosmos2-serve demo [--engine pixels]            # tiny model, local service, one request per task, drawn, then stop
kosmos2-serve batch -i requests.jsonl -o results.jsonl   # OpenAI's batch file format, on Ray Data
kosmos2-serve batch --images DIR -o OUT --task caption   # a folder, glob or table of images to Parquet

API keys are read from the environment only (KOSMOS_API_KEYS, comma-separated), never from the command line.
Exit codes: 0 done, 1 a failure (a model that cannot be found, a service that cannot start), 2 a usage error
(bad options, a config file that does not check).
"""

from __future__ import annotations

import argparse
import signal
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from serve.batch.cli import add_parser as add_batch_parser
from serve.batch.cli import main as batch_main

USAGE_ERROR = 2
FAILURE = 1


def package_version() -> str:
    try:
        return version("kosmos2-serve")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def program_name(module: str) -> str:
    """The name the user typed: the console script's, or ``python -m MODULE``."""
    name = Path(sys.argv[0]).name
    return f"python -m {module}" if name in ("__main__.py", "-c", "") else name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=program_name("serve"), description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="serve in the foreground until Ctrl-C or SIGTERM")
    add_config_options(run)
    run.add_argument("--dashboard", action="store_true", help="start Ray's dashboard (Serve's REST API) too")
    run.add_argument(
        "--num-cpus", type=int, help="CPUs of the Ray this starts (default: the machine's); requests are fitted to it"
    )
    run.add_argument(
        "--drain-timeout",
        type=float,
        help="on SIGTERM or Ctrl-C, how long requests in flight may take to finish (default 30 s)",
    )

    build = commands.add_parser("build", help="print the Serve config file of a config, as `serve build` writes it")
    add_config_options(build)
    build.add_argument("-o", "--output", type=Path, help="write it to this file (default: print it)")

    tiny = commands.add_parser("tiny", help="write the tiny offline Kosmos-2 (model and processor) to DIR")
    tiny.add_argument("directory")
    tiny.add_argument(
        "--real-size", action="store_true", help="the real architecture's config and vocabulary, no weights"
    )

    demo = commands.add_parser(
        "demo", help="serve the tiny model locally, send one request per task, draw the answers' boxes"
    )
    demo.add_argument("--port", type=int, default=8000)
    demo.add_argument(
        "--engine", choices=["fast", "hf", "pixels"], help="the config's (fast) or pixels: answers that box a red disc"
    )
    demo.add_argument("--out", type=Path, default=Path("out/demo.png"), help="the drawing (%(default)s)")
    add_batch_parser(commands)
    return parser


def add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="Hugging Face id or local folder (default: the config's, else the real model)")
    parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default 8000)")
    parser.add_argument("--config", help="YAML: plain ServiceConfig fields, or a Serve config file")
    parser.add_argument(
        "--engine",
        choices=["fast", "hf", "pixels"],
        help="generation engine (default fast); pixels: no model, answers that box what differs from the top-left "
        "pixel (docs/testing.md)",
    )
    parser.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    parser.add_argument("--load-format", choices=["auto", "dummy"], help="dummy: random weights, for benchmarks")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "tiny":
        from serve.kosmos2.tiny import write_tiny

        print(write_tiny(args.directory, real_size=args.real_size))
        return 0
    if args.command == "demo":
        from serve.app.demo import main as demo_main

        return demo_main(args.port, args.engine, args.out)
    if args.command == "batch":
        return batch_main(args, parser)
    if args.command == "run":
        for sig in (signal.SIGINT, signal.SIGTERM):  # nothing is started yet: a stop is an exit
            signal.signal(sig, lambda signum, frame: sys.exit(0))
    from serve.app.config import ConfigError, config_from_args

    try:
        config = config_from_args(args, http__host=args.host, http__port=args.port)
    except (ConfigError, OSError) as exc:
        parser.exit(USAGE_ERROR, f"{parser.prog}: error: {exc}\n")
    if args.command == "build":
        return write_serve_config(config, args.output)
    from serve.app.launch import run_until_signalled
    from serve.engine.model import ModelUnavailable, load_processor

    try:  # fail in one sentence here, not in a replica that Serve restarts over and over
        load_processor(config.model.source)
    except ModelUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return FAILURE
    return run_until_signalled(
        config, dashboard=args.dashboard, num_cpus=args.num_cpus, drain_timeout_s=args.drain_timeout
    )


def write_serve_config(config, output: Path | None) -> int:
    import yaml

    from serve.app.builder import serve_config

    text = f"# The Serve config of kosmos2-serve {package_version()} (kosmos2-serve build).\n" + yaml.safe_dump(
        serve_config(config), sort_keys=False
    )
    if output is None:
        print(text, end="")
    else:
        output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

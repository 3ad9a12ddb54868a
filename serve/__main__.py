"""Command line of the service.

python -m serve run --model microsoft/kosmos-2-patch14-224 [--host 127.0.0.1] [--port 8000] [--config FILE]
                    [--num-cpus N] [--drain-timeout SECONDS]
python -m serve tiny DIR [--real-size]      # the tiny offline model (or the real architecture's config)
python -m serve demo                        # tiny model, local service, one request per task, then stop
"""

from __future__ import annotations

import argparse
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m serve", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="serve in the foreground until Ctrl-C or SIGTERM")
    run.add_argument("--model", help="Hugging Face id or local folder (default: the config's, else the real model)")
    run.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    run.add_argument("--port", type=int, help="port (default 8000)")
    run.add_argument("--config", help="YAML: plain ServiceConfig fields, or a Serve config file")
    run.add_argument("--engine", choices=["fast", "hf"], help="generation engine (default fast)")
    run.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"])
    run.add_argument("--load-format", choices=["auto", "dummy"], help="dummy: random weights, for benchmarks")
    run.add_argument("--dashboard", action="store_true", help="start Ray's dashboard (Serve's REST API) too")
    run.add_argument(
        "--num-cpus", type=int, help="CPUs of the Ray this starts (default: the machine's); requests are fitted to it"
    )
    run.add_argument(
        "--drain-timeout",
        type=float,
        help="on SIGTERM or Ctrl-C, how long requests in flight may take to finish (default 30 s)",
    )

    tiny = commands.add_parser("tiny", help="write the tiny offline Kosmos-2 (model and processor) to DIR")
    tiny.add_argument("directory")
    tiny.add_argument(
        "--real-size", action="store_true", help="the real architecture's config and vocabulary, no weights"
    )

    demo = commands.add_parser("demo", help="serve the tiny model locally and send one request per task")
    demo.add_argument("--port", type=int, default=8000)

    args = parser.parse_args(argv)
    if args.command == "tiny":
        from serve.kosmos2.tiny import write_tiny

        print(write_tiny(args.directory, real_size=args.real_size))
    elif args.command == "run":
        for sig in (signal.SIGINT, signal.SIGTERM):  # nothing is started yet: a stop is an exit
            signal.signal(sig, lambda signum, frame: sys.exit(0))
        from serve.app.config import load_config
        from serve.app.launch import run_until_signalled
        from serve.engine.model import ModelUnavailable, load_processor

        config = load_config(
            args.config,
            model__source=args.model,
            model__dtype=args.dtype,
            model__load_format=args.load_format,
            http__host=args.host,
            http__port=args.port,
            engine__kind=args.engine,
        )
        try:  # fail in one sentence here, not in a replica that Serve restarts over and over
            load_processor(config.model.source)
        except ModelUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        return run_until_signalled(
            config, dashboard=args.dashboard, num_cpus=args.num_cpus, drain_timeout_s=args.drain_timeout
        )
    elif args.command == "demo":
        from serve.app.demo import main as demo_main

        return demo_main(args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())

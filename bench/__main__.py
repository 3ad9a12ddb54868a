"""Command line of the bench: load runs, engine-only and preprocessing runs, pricing, and reports.

    python -m bench run --url http://127.0.0.1:8000 --duration 30 --concurrency 1,4,16 --nodes g5.xlarge --out DIR
    python -m bench run --url URL --rate 2,4,8 [--burstiness 0.5] --stream --percentiles 50,90,99 \\
        --goodput ttft:500 tpot:50 e2el:2000 --out DIR
    python -m bench run --url URL --shape 2:60,2-20:120,20:60,2:60 --serve-api http://127.0.0.1:8265 --out DIR
    python -m bench engine --model M --engine hf,fast --batch-sizes 1,8,32 [--load-format dummy] --out DIR
    python -m bench engine --model M --engine fast --batch-sizes 1024 --output-lengths 16,32,64,128 --out DIR
    python -m bench preprocess --duration 3 --out DIR
    python -m bench price RUN_DIR [RUN_DIR ...] --utilization 0.3,0.5,0.7,1 --out DIR
    python -m bench report RUN_DIR [--engine-baseline ENGINE_DIR]
    python -m bench demo --out out/bench     # make bench: the tiny model served here, a short run, a clean stop

Every command writes its files under ``--out`` (see ``bench/__init__.py`` for the layout) and prints a short
table. ``python -m bench COMMAND --help`` lists each command's options with their defaults. The command is also
installed as ``kosmos2-bench``.

The service's API key, if it needs one, is read from the environment variable KOSMOS_API_KEY (never from the
command line). Exit codes: 0 done; 1 a failure (the service never became ready, or failed the run); 2 a usage
error (bad options or values, a file named that is not there).
"""

from __future__ import annotations

import logging
import sys

from bench.cli import build_parser
from bench.commands import COMMANDS
from serve.app.client import APIError

USAGE_ERROR, FAILURE = 2, 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as exc:  # a bad value, or a file named that is not there
        print(f"{parser.prog} {args.command}: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except (TimeoutError, ConnectionError, APIError) as exc:  # the service or the machine failed the run
        print(f"{parser.prog} {args.command}: {exc}", file=sys.stderr)
        return FAILURE


if __name__ == "__main__":
    sys.exit(main())

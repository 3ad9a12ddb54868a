"""Command line: ``python -m serve tiny DIR`` writes the tiny offline model; ``python -m serve run`` serves."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    tiny = commands.add_parser("tiny", help="write the tiny offline Kosmos-2 (model and processor) to DIR")
    tiny.add_argument("directory")
    tiny.add_argument(
        "--real-size", action="store_true", help="the real architecture's config and vocabulary, no weights"
    )
    args = parser.parse_args(argv)
    if args.command == "tiny":
        from serve.tiny import write_tiny

        print(write_tiny(args.directory, real_size=args.real_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())

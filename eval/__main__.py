"""Command line of the referring-expression evaluation.

    python -m eval synth --out DIR --n 500 --seed 0
    python -m eval run --annotations DIR/finetune_synth_val.json --images DIR/images --predictor ceiling --out OUT
    python -m eval run --annotations finetune_refcoco_val.json finetune_refcoco_testA.json \\
        --images coco/train2014 --predictor api --url http://127.0.0.1:8000 --concurrency 32 --out OUT
    python -m eval run --refer 'refcoco/refs(unc).p' --split val --images coco --predictor engine --model DIR --out OUT
    python -m eval run --parquet RefCOCO/data/testA-*.parquet --predictor api --url http://127.0.0.1:8000 --out OUT
    python -m eval audit-tokens 'refcocog/refs(umd).p' finetune_refcoco_val.json

``run`` writes OUT/predictions.jsonl, summary.json, report.md and examples.png, and resumes from a partial
OUT/predictions.jsonl, scoring the stored answers against the annotations given now. ``audit-tokens`` counts the
expressions that transformers' clean-up of tokenization spaces would change. docs/evaluation.md has the recipe
for the paper's table. The command is also installed as ``kosmos2-eval``.

The service's API key, if it needs one, is read from the environment variable KOSMOS_API_KEY (never from the
command line, where shell history and ``ps`` would show it).

Exit codes: 0 done; 1 a failure (some expressions failed: rerun to retry them; or the service refused or
failed); 2 a usage error (bad options, or data, images or an output folder that do not go together).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from eval.audit import audit, render
from eval.datasets import DatasetError, RefExample, load_mdetr, load_refer
from eval.predictors import APIPredictor, Predictor
from eval.records import RunError
from eval.references import CeilingPredictor, RoundTripPredictor, WholeImagePredictor
from eval.runner import evaluate
from eval.synth import write_synthetic
from eval.tables import load_table
from serve.app.client import APIError

API_KEY_ENV = "KOSMOS_API_KEY"
USAGE_ERROR, FAILURE = 2, 1


def package_version() -> str:
    try:
        return version("kosmos2-serve")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    name = Path(sys.argv[0]).name
    parser = argparse.ArgumentParser(
        prog="python -m eval" if name in ("__main__.py", "-c", "") else name,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="evaluate a predictor on referring expressions")
    data = run.add_argument_group("data (at least one source)")
    data.add_argument(
        "--annotations", nargs="+", default=[], metavar="FILE", help="MDETR finetune_*.json / final_*.json files"
    )
    data.add_argument("--refer", metavar="REFS", help="a refer-toolkit refs(unc).p / refs(umd).p / refs(google).p")
    data.add_argument("--instances", metavar="FILE", help="COCO instances.json of --refer (default: beside it)")
    data.add_argument(
        "--parquet", nargs="+", default=[], metavar="FILE", help="lmms-lab, jxu124 or other Parquet files"
    )
    data.add_argument("--jsonl", nargs="+", default=[], metavar="FILE", help="Qwen-VL/InternVL or other JSONL files")
    data.add_argument("--images", metavar="DIR", help="image folder (tables: default the file's folder)")
    data.add_argument(
        "--split", action="append", help="keep only this split (repeatable); --refer: default all but train"
    )
    data.add_argument("--dataset", help="dataset name for --refer and tables (default: from the path)")
    data.add_argument(
        "--bbox-format",
        choices=("auto", "xywh", "xyxy"),
        default="auto",
        help="tables' bbox column (default auto: the layout's, xyxy for jxu124 and Qwen-VL, else xywh); "
        "every box is checked against its image",
    )
    data.add_argument("--limit", type=int, help="evaluate only the first N expressions")

    run.add_argument(
        "--predictor",
        choices=("api", "engine", "roundtrip", "ceiling", "whole-image"),
        required=True,
        help="the model (api, engine), or a reference: roundtrip (the truth through the grid), ceiling (the best "
        "token pair per box), whole-image (a floor)",
    )
    run.add_argument("--out", required=True, help="output folder (reused: the run resumes)")
    run.add_argument("--max-tokens", type=int, default=64, help="api/engine: tokens to generate (default 64)")
    run.add_argument("--examples", type=int, default=16, help="panels in examples.png")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    api = run.add_argument_group("--predictor api", f"the API key, if the service needs one: ${API_KEY_ENV}")
    api.add_argument("--url", help="the service, e.g. http://127.0.0.1:8000")
    api.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    api.add_argument("--max-retries", type=int, default=5, help="tries after a transient failure (default 5)")
    api.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")

    engine = run.add_argument_group("--predictor engine")
    engine.add_argument("--model", help="Hugging Face id or folder (default: the service's default model)")
    engine.add_argument("--engine", choices=("hf", "fast"), default="hf", help="engine path (default hf)")
    engine.add_argument("--device", default="auto")
    engine.add_argument(
        "--dtype",
        default="float32",
        choices=("auto", "float32", "float16", "bfloat16"),
        help="default float32, as the official run (auto: float16 on CUDA)",
    )
    engine.add_argument("--batch-size", type=int, default=8)

    synth = commands.add_parser("synth", help="write a synthetic RefCOCO-style set in MDETR's format")
    synth.add_argument("--out", required=True, help="folder for images/ and finetune_synth_{split}.json")
    synth.add_argument("--n", type=int, default=500, help="number of expressions")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--split", default="val")

    tokens = commands.add_parser("audit-tokens", help="count expressions the tokenizer's space clean-up changes")
    tokens.add_argument("files", nargs="+", metavar="FILE", help="refs(*).p, MDETR .json, .parquet or .jsonl files")
    return parser


def load_examples(args: argparse.Namespace) -> list[RefExample]:
    """The expressions every source names, filtered by split and limited."""
    examples: list[RefExample] = []
    for path in args.annotations:
        examples += load_mdetr(path, args.images)
    if args.refer:
        examples += load_refer(args.refer, args.images, args.instances, args.split, args.dataset)
    for path in [*args.parquet, *args.jsonl]:
        examples += load_table(path, args.images, dataset=args.dataset, bbox_format=args.bbox_format)
    if args.split:
        examples = [e for e in examples if e.split in args.split]
    return examples[: args.limit] if args.limit is not None else examples


def build_predictor(args: argparse.Namespace) -> Predictor:
    references = {"roundtrip": RoundTripPredictor, "ceiling": CeilingPredictor, "whole-image": WholeImagePredictor}
    if args.predictor in references:
        return references[args.predictor]()
    if args.predictor == "api":
        return APIPredictor(
            args.url,
            api_key=os.environ.get(API_KEY_ENV) or None,
            concurrency=args.concurrency,
            max_retries=args.max_retries,
            max_tokens=args.max_tokens,
            timeout=args.timeout,
        )
    from eval.predictors import EnginePredictor
    from serve.engine.build import build_engine
    from serve.engine.config import DEFAULT_MODEL, EngineConfig
    from serve.engine.model import load_model

    loaded = load_model(args.model or DEFAULT_MODEL, device=args.device, dtype=args.dtype)
    room = min(2048, args.max_tokens + 256)  # the prompt (image, tags, expression) is under 256 tokens
    engine = build_engine(loaded, EngineConfig(kind=args.engine, max_batch_size=args.batch_size, max_seq_len=room))
    return EnginePredictor(loaded, engine, batch_size=args.batch_size, max_tokens=args.max_tokens)


def run(args: argparse.Namespace) -> int:
    examples = load_examples(args)
    predictor = build_predictor(args)
    config: dict[str, Any] = {
        "sources": {k: getattr(args, k) for k in ("annotations", "refer", "parquet", "jsonl") if getattr(args, k)},
        "images": args.images,
        "split": args.split,
        "bbox_format": args.bbox_format,
        "limit": args.limit,
    }
    summary = asyncio.run(evaluate(examples, predictor, args.out, config, not args.no_progress, args.examples))
    low, high = summary["accuracy_ci95"]
    print(
        f"accuracy {100 * summary['accuracy']:.2f}% (95% {100 * low:.1f}-{100 * high:.1f})  "
        f"any box {100 * summary['any_box_accuracy']:.2f}%  "
        f"n {summary['n']}  no box {summary['no_box']} (phrase mismatch {summary['phrase_mismatch']}, "
        f"no object {summary['no_object']})  errors {summary['errors']}  -> {args.out}"
    )
    for caveat in summary["caveats"]:
        print(f"kept out of the paper's table: {caveat}")
    if not summary["complete"]:
        print(f"{summary['errors']} expressions failed (see 'error' in predictions.jsonl); rerun to retry them")
        return FAILURE
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        if not (args.annotations or args.refer or args.parquet or args.jsonl):
            parser.error("give at least one of --annotations, --refer, --parquet, --jsonl")
        if (args.annotations or args.refer) and not args.images:
            parser.error("--annotations and --refer need --images, the folder of the images")
        if args.predictor == "api" and not args.url:
            parser.error("--predictor api needs --url")
    try:
        if args.command == "audit-tokens":
            print(render(audit(args.files)))
            return 0
        if args.command == "synth":
            path = write_synthetic(args.out, args.n, args.seed, args.split)
            print(f"{path}\nrun: python -m eval run --annotations {path} --images {path.parent / 'images'} ...")
            return 0
        return run(args)
    except (DatasetError, RunError, FileNotFoundError) as exc:  # what the command line named does not work
        print(f"error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    except (APIError, TimeoutError, ConnectionError) as exc:  # the service or the machine failed the run
        print(f"error: {exc}", file=sys.stderr)
        return FAILURE


if __name__ == "__main__":
    sys.exit(main())

"""Command line of the referring-expression evaluation.

    python -m eval synth --out DIR --n 500 --seed 0
    python -m eval run --annotations DIR/finetune_synth_val.json --images DIR/images --predictor oracle --out OUT
    python -m eval run --annotations finetune_refcoco_val.json finetune_refcoco_testA.json \\
        --images coco/train2014 --predictor api --url http://127.0.0.1:8000 --concurrency 32 --out OUT
    python -m eval run --refer 'refcoco/refs(unc).p' --split val --images coco --predictor engine --model DIR --out OUT
    python -m eval run --parquet RefCOCO/data/val-*.parquet --predictor api --url http://127.0.0.1:8000 --out OUT

``run`` writes OUT/predictions.jsonl, summary.json, report.md and examples.png, and resumes from a partial
OUT/predictions.jsonl. It exits 1 when some expressions failed (rerun to retry them) and 2 on a fatal error.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

from eval.datasets import DatasetError, RefExample, load_mdetr, load_refer, load_table
from eval.predictors import APIPredictor, OraclePredictor, Predictor, WholeImagePredictor
from eval.records import RunError
from eval.runner import evaluate
from eval.synth import write_synthetic
from serve.app.client import APIError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="evaluate a predictor on referring expressions")
    data = run.add_argument_group("data (at least one source)")
    data.add_argument("--annotations", nargs="+", default=[], metavar="FILE", help="MDETR finetune_*.json files")
    data.add_argument("--refer", metavar="REFS", help="a refer-toolkit refs(unc).p / refs(umd).p")
    data.add_argument("--instances", metavar="FILE", help="COCO instances.json of --refer (default: beside it)")
    data.add_argument("--parquet", nargs="+", default=[], metavar="FILE", help="Hugging Face style Parquet files")
    data.add_argument("--jsonl", nargs="+", default=[], metavar="FILE", help="JSONL exports, one row per box")
    data.add_argument("--images", metavar="DIR", help="image folder (tables: default the file's folder)")
    data.add_argument(
        "--split", action="append", help="keep only this split (repeatable); --refer: default all but train"
    )
    data.add_argument("--dataset", help="dataset name for --refer and tables (default: from the path)")
    data.add_argument("--bbox-format", choices=("xywh", "xyxy"), default="xywh", help="tables' bbox column")
    data.add_argument("--limit", type=int, help="evaluate only the first N expressions")

    run.add_argument("--predictor", choices=("api", "engine", "oracle", "whole-image"), required=True)
    run.add_argument("--out", required=True, help="output folder (reused: the run resumes)")
    run.add_argument("--max-tokens", type=int, default=64, help="api/engine: tokens to generate (default 64)")
    run.add_argument("--examples", type=int, default=16, help="panels in examples.png")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")

    api = run.add_argument_group("--predictor api")
    api.add_argument("--url", help="the service, e.g. http://127.0.0.1:8000")
    api.add_argument("--concurrency", type=int, default=16, help="requests in flight (default 16)")
    api.add_argument("--max-retries", type=int, default=5, help="tries after a transient failure (default 5)")
    api.add_argument("--api-key", default=os.environ.get("KOSMOS_API_KEY"), help="default: $KOSMOS_API_KEY")
    api.add_argument("--timeout", type=float, default=120.0, help="seconds per request (default 120)")

    engine = run.add_argument_group("--predictor engine")
    engine.add_argument("--model", help="Hugging Face id or folder (default: the service's default model)")
    engine.add_argument("--engine", choices=("hf", "fast"), default="hf", help="engine path (default hf)")
    engine.add_argument("--device", default="auto")
    engine.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    engine.add_argument("--batch-size", type=int, default=8)

    synth = commands.add_parser("synth", help="write a synthetic RefCOCO-style set in MDETR's format")
    synth.add_argument("--out", required=True, help="folder for images/ and finetune_synth_{split}.json")
    synth.add_argument("--n", type=int, default=500, help="number of expressions")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--split", default="val")
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
    if args.predictor == "oracle":
        return OraclePredictor()
    if args.predictor == "whole-image":
        return WholeImagePredictor()
    if args.predictor == "api":
        return APIPredictor(
            args.url,
            api_key=args.api_key,
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
    engine = build_engine(loaded, EngineConfig(kind=args.engine, max_batch_size=args.batch_size))
    return EnginePredictor(loaded, engine, batch_size=args.batch_size, max_tokens=args.max_tokens)


def run(args: argparse.Namespace) -> int:
    examples = load_examples(args)
    predictor = build_predictor(args)
    config: dict[str, Any] = {
        "sources": {k: getattr(args, k) for k in ("annotations", "refer", "parquet", "jsonl") if getattr(args, k)},
        "images": args.images,
        "split": args.split,
        "limit": args.limit,
    }
    summary = asyncio.run(evaluate(examples, predictor, args.out, config, not args.no_progress, args.examples))
    print(
        f"accuracy {100 * summary['accuracy']:.2f}%  any box {100 * summary['any_box_accuracy']:.2f}%  "
        f"n {summary['n']}  no box {summary['no_box']} (phrase mismatch {summary['phrase_mismatch']}, "
        f"no object {summary['no_object']})  errors {summary['errors']}  -> {args.out}"
    )
    if not summary["complete"]:
        print(f"{summary['errors']} expressions failed (see 'error' in predictions.jsonl); rerun to retry them")
        return 1
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
        if args.command == "synth":
            path = write_synthetic(args.out, args.n, args.seed, args.split)
            print(f"{path}\nrun: python -m eval run --annotations {path} --images {path.parent / 'images'} ...")
            return 0
        return run(args)
    except (DatasetError, RunError, APIError, FileNotFoundError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

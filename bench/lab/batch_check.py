"""The batch mode checked end to end with the tiny model, against a live service on the same machine:
``results/batch-cpu/`` is its output.

    python -m bench.lab.batch_check --out results/batch-cpu                     # 2,000 + 20 lines, 500 images
    python -m bench.lab.batch_check --out out/batch-10x --lines 20000 --images 5000 --no-compare --no-interrupt

1. **A batch file**: ``--lines`` requests mixing every task and option, plus 20 lines that must fail (10 that are
   no request, 10 the API refuses), through ``python -m serve batch``; every output line's answer is then
   compared with the live service's answer to the same body (log-probabilities within 1e-4, the rest equal).
2. **A folder of images** to Parquet, interrupted (SIGINT) once about half of its rows are written, then run
   again with the same output: every image once.
3. Each run's ``summary.json`` (throughput, CPU, the peak memory of the driver, of the largest worker and of the
   whole process tree) is kept; running again at 10x the input shows whether memory stays bounded.

``check.json`` holds the counts and the verdicts, and the steps' commands (``WORK`` is the temporary folder of
the inputs, the model and the logs, removed when the check passes and kept, with its path printed, when a step
fails).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq

from bench.lab.perf_run import run, start_service
from bench.workload import encode, synthetic_photo
from serve.app.client import chat_request
from serve.app.config import load_config
from serve.kosmos2.tiny import write_tiny

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/local.yaml"
REGIONS = ([0.1, 0.2, 0.6, 0.9], [0.0, 0.0, 0.5, 0.5], [0.3, 0.3, 1.0, 1.0])
QUESTIONS = ("what is in the picture?", "what colour is it?", "where is the light?")
EXPRESSIONS = ("the disc", "a dog", "the left shape")


def pictures(count: int, seed: int = 0) -> list[bytes]:
    """``count`` distinct small photograph-like images, JPEG and PNG."""
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes = ((160, 120), (120, 160), (200, 150), (96, 96))
    return [encode(synthetic_photo(*sizes[n % 4], rng), "jpeg" if n % 3 else "png") for n in range(count)]


def good_body(n: int, images: list[bytes], model: str) -> dict[str, Any]:
    """The n-th request of the mix: every task, and stop strings, log-probabilities, sampling with a seed, the
    repeat ban, fixed lengths, a system message and the model's name in turn."""
    image, rng = images[n % len(images)], random.Random(n)
    task = ("caption", "detailed_caption", "vqa", "ground", "describe_region", "raw")[n % 6]
    fields: dict[str, Any] = {"task": task, "max_tokens": rng.choice((6, 10, 16))}
    if task == "vqa":
        fields["text"] = rng.choice(QUESTIONS)
    elif task == "ground":
        fields["text"] = rng.choice(EXPRESSIONS)
    elif task == "describe_region":
        fields["region"] = rng.choice(REGIONS)
    elif task == "raw":
        fields["text"] = "<grounding> An image of"
    extra = n // 6 % 7
    if extra == 1:
        fields["stop"] = [rng.choice(("e", "a ", "o"))]
    elif extra == 2:
        fields.update(logprobs=True, top_logprobs=2)
    elif extra == 3:
        fields.update(temperature=0.8, top_p=0.9, seed=n)
    elif extra == 4:
        fields["no_repeat_ngram_size"] = 2
    elif extra == 5:
        fields.update(ignore_eos=True, max_completion_tokens=fields.pop("max_tokens"))
    elif extra == 6:
        fields["model"] = model
    body = chat_request(image, **fields)
    body.pop("stream")
    if n % 50 == 7:
        body["messages"].insert(0, {"role": "system", "content": "Be brief."})
    return body


def bad_lines(images: list[bytes]) -> list[tuple[bytes, str]]:
    """Twenty lines that must fail, each with a word its error must hold: ten that are no request (the batch
    format's ``error``, its code), ten whose body the API refuses (a ``response`` with the API's error, its
    param or message)."""
    caption = chat_request(images[0], task="caption", max_tokens=5)
    caption.pop("stream")
    long_text = [caption["messages"][0]["content"][0], {"type": "text", "text": "why " * 300}]

    def line(custom_id: Any, body: Any = None, method: str = "POST", url: str = "/v1/chat/completions") -> bytes:
        found = {"custom_id": custom_id, "method": method, "url": url}
        return json.dumps(found if body is None else {**found, "body": body}).encode()

    return [
        (b"{not json", "invalid_json"),
        (b'["a", "list"]', "invalid_json"),
        (b'"a string"', "invalid_json"),
        (b'{"custom_id": "bad-cut", "method": "POST", "body": {', "invalid_json"),
        (b'{"custom_id": "bad-bytes", "body": "\xff\xfe' + b"\xff" + b'"}', "invalid_json"),
        (b'{"method": "POST", "url": "/v1/chat/completions", "body": {}}', "missing_custom_id"),
        (line(7, {}), "missing_custom_id"),
        (line("bad-method", {}, method="GET"), "invalid_method"),
        (line("bad-url", {}, url="/v1/embeddings"), "invalid_url"),
        (line("bad-no-body"), "missing_body"),
        (line("bad-task", {**caption, "task": "dance"}), "task"),
        (line("bad-field", {**caption, "frobnicate": 1}), "frobnicate"),
        (line("bad-top-p", {**caption, "top_p": 5}), "top_p"),
        (line("bad-n", {**caption, "n": 2}), "n"),
        (line("bad-model", {**caption, "model": "gpt-4o"}), "model"),
        (line("bad-image", chat_request(b"plain text, no image", task="caption")), "image"),
        (line("bad-no-text", {**caption, "task": "vqa"}), "text"),
        (line("bad-region", {**caption, "region": [0.5, 0.5, 0.1, 0.1]}), "region"),
        (line("bad-stream", {**caption, "stream": True}), "stream"),
        (
            line("bad-too-long", {**caption, "task": "vqa", "messages": [{"role": "user", "content": long_text}]}),
            "context_length_exceeded",
        ),
    ]


def same(mine: Any, live: Any) -> bool:
    """Equal, but for floats (log-probabilities, which a batch of other requests may round otherwise: 1e-4)."""
    if isinstance(mine, float) and isinstance(live, float):
        return abs(mine - live) <= 1e-4
    if isinstance(mine, dict) and isinstance(live, dict):
        return mine.keys() == live.keys() and all(same(mine[k], live[k]) for k in mine)
    if isinstance(mine, list) and isinstance(live, list):
        return len(mine) == len(live) and all(same(a, b) for a, b in zip(mine, live))
    return mine == live


async def live_answers(url: str, bodies: dict[str, dict[str, Any]], concurrency: int = 8) -> dict[str, Any]:
    """The service's (status, body) for each body, by custom_id."""
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=300) as client:

        async def one(custom_id: str, body: dict[str, Any]) -> tuple[str, tuple[int, Any]]:
            async with limit:
                response = await client.post(f"{url}/v1/chat/completions", json=body)
                return custom_id, (response.status_code, response.json())

        return dict(await asyncio.gather(*(one(k, v) for k, v in bodies.items())))


def compare(output: Path, bodies: dict[str, dict[str, Any]], bad: list[tuple[bytes, str]], url: str | None) -> dict:
    """The batch file's verdicts: one line per input line, the bad ones failed naming their cause, every answer
    the service's (when ``url``)."""
    written = [json.loads(text) for text in output.read_text().splitlines()]
    by_id = {w["custom_id"]: w for w in written if w["custom_id"] is not None}
    errors = [w for w in written if w["error"] is not None or w["response"]["status_code"] != 200]
    named = []
    for text, word in bad:
        found = [w for w in errors if _raw_id(text) == w["custom_id"]] if _raw_id(text) else []
        for w in found or [w for w in errors if w["custom_id"] is None]:
            error = w["error"] or w["response"]["body"]["error"]
            if word in json.dumps(error):
                named.append(word)
                break
    verdict: dict[str, Any] = {
        "lines_in": len(bodies) + len(bad),
        "lines_out": len(written),
        "errors": len(errors),
        "errors_naming_their_cause": len(named),
        "answers": len(written) - len(errors),
    }
    if url is not None:
        live = asyncio.run(live_answers(url, bodies))
        strip = ("id", "created")
        differ = [
            custom_id
            for custom_id, (status, body) in live.items()
            if by_id[custom_id]["response"]["status_code"] != status
            or not same(
                {k: v for k, v in by_id[custom_id]["response"]["body"].items() if k not in strip},
                {k: v for k, v in body.items() if k not in strip},
            )
        ]
        verdict |= {"compared_with_the_service": len(live), "differing_from_the_service": differ}
    return verdict


def _raw_id(text: bytes) -> str | None:
    try:
        found = json.loads(text).get("custom_id")
    except (ValueError, AttributeError):
        return None
    return found if isinstance(found, str) else None


def batch(model: Path, *args: str, log: Path, summary: Path) -> list[str]:
    command = [sys.executable, "-m", "serve", "batch", "--model", str(model), "--config", CONFIG, *args]
    command += ["--summary", str(summary), "--no-progress"]
    run(command, log)
    return command


def interrupted(command: list[str], output: Path, rows: int, log: Path) -> tuple[int, int]:
    """Run ``command`` and interrupt it (SIGINT, as Ctrl-C) once ``rows`` rows are written; returns the rows
    written by then and its exit status."""
    print("$", " ".join(command), "# interrupted", flush=True)
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        written = 0
        while process.poll() is None and written < rows:
            time.sleep(0.1)
            written = sum(pq.read_metadata(p).num_rows for p in output.glob("part-*.parquet"))
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=300)
    print(f"  (exit {code} with {written} rows written)", flush=True)
    return written, code


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lab.batch_check", description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--lines", type=int, default=2000, help="good requests in the batch file (%(default)s)")
    parser.add_argument("--images", type=int, default=500, help="images in the folder (%(default)s)")
    parser.add_argument("--port", type=int, default=18230, help="the live service's port (%(default)s)")
    parser.add_argument("--no-compare", action="store_true", help="no live service: counts and memory only")
    parser.add_argument("--no-interrupt", action="store_true", help="run the folder once, uninterrupted")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kosmos2-batch-check-"))
    model = work / "tiny"
    write_tiny(model)
    images = pictures(64)
    name = load_config(CONFIG, model__source=str(model)).served_model_name
    bodies = {f"req-{n:06d}": good_body(n, images, name) for n in range(args.lines)}
    bad = bad_lines(images)
    lines = [
        json.dumps({"custom_id": k, "method": "POST", "url": "/v1/chat/completions", "body": v}).encode()
        for k, v in bodies.items()
    ]
    step = max(1, len(lines) // len(bad))
    for n, (text, _) in enumerate(bad):
        lines.insert(n * (step + 1), text)
    requests, results = work / "requests.jsonl", work / "results.jsonl"
    requests.write_bytes(b"\n".join(lines) + b"\n")
    commands = [
        batch(model, "-i", str(requests), "-o", str(results), log=work / "file.log", summary=out / "file-summary.json")
    ]
    service = (
        None if args.no_compare else start_service(["--model", str(model)], CONFIG, args.port, work / "service.log")
    )
    try:
        url = None if service is None else f"http://127.0.0.1:{args.port}"
        check: dict[str, Any] = {"batch_file": compare(results, bodies, bad, url)}
    finally:
        if service is not None:
            service.send_signal(signal.SIGINT)
            service.wait(timeout=120)
    folder, parquet = work / "photos", work / "captions"
    for n in range(args.images):
        name = folder / f"{n // 100:02d}" / f"{n:05d}.{'png' if n % 3 == 0 else 'jpg'}"
        name.parent.mkdir(parents=True, exist_ok=True)
        name.write_bytes(images[n % len(images)])
    options = ["--images", str(folder), "-o", str(parquet), "--task", "caption", "--max-tokens", "12"]
    first = code = None
    if not args.no_interrupt:
        command = [
            sys.executable,
            "-m",
            "serve",
            "batch",
            "--model",
            str(model),
            "--config",
            CONFIG,
            *options,
            "--rows-per-file",
            "25",
            "--no-progress",
        ]
        first, code = interrupted(command, parquet, args.images // 2, work / "folder-interrupted.log")
        commands.append(command)
    commands.append(
        batch(model, *options, "--rows-per-file", "25", log=work / "folder.log", summary=out / "folder-summary.json")
    )
    table = pq.read_table(parquet, columns=["id", "error"])
    ids = table.column("id").to_pylist()
    check["folder"] = {
        "images": args.images,
        "rows_before_the_interruption": first,
        "exit_status_of_the_interrupted_run": code,
        "rows": len(ids),
        "distinct_ids": len(set(ids)),
        "errors": len(ids) - table.column("error").null_count,
    }
    check["commands"] = [
        " ".join(c).replace(sys.executable, "python").replace(str(work), "WORK").replace(f"{ROOT}/", "")
        for c in commands
    ]
    (out / "check.json").write_text(json.dumps(check, indent=2) + "\n")
    print(json.dumps({k: v for k, v in check.items() if k != "commands"}, indent=2))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

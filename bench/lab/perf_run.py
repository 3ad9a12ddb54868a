"""The performance run: the engine paths side by side (static batches, closed loops at the engine as a
service drives it, and open loops at the rates a service hands requests over), the service on the same machine
under a closed-loop sweep and an open-loop point at 80% of its peak, then where the fast engine's time goes;
one JSON with the card's name.

    python -m bench.lab.perf_run --out results/perf-h100                # GPU: real-size random weights, fp16
    python -m bench.lab.perf_run --out out/perf --tiny --quick          # CPU: the tiny model, a smoke run
    python -m bench.lab.perf_run --out out/perf --concurrency 1,128,384 --no-profile
                                                                        # GPU, shorter: three loads
    python -m bench.lab.perf_run --out out/perf --engine-only           # GPU: the engine's goals, no service
    python -m bench.lab.perf_run --out out/perf --paths fast --output-lengths 16,32,64,128 \\
        --service-lengths 16,64,128 --no-profile                        # GPU: what an image costs by length

The workload is the performance goal's: brief grounded captions of 640x480 JPEGs, exactly 32 new tokens
(``ignore_eos``). Each step is the ordinary CLI (``python -m bench engine``, ``python -m serve run``,
``python -m bench run``), so every figure can be reproduced alone; ``perf.json`` gathers them with the
commands that made them. The CPU each process spends a request is counted over the 80% point; then the sweep's
busiest point runs again while py-spy (a dev dependency) samples the Python stacks of one Generator replica, its
engine process, one Ingress and one Preprocessor (``py-spy-<role>.txt``, collapsed).

``--batch N`` runs the batch mode (``python -m serve batch``) last, on a table of N images of the same
workload (``batch/``, its ``summary.json`` priced by ``python -m bench price`` beside the service's).

For the price of an image by the length of its answer (``python -m bench price``), ``--output-lengths`` measures
the engine at each of those exact numbers of new tokens in turn (``engine/``), and ``--service-lengths`` runs the
service's busiest point again at each of those (``service-<n>tokens/``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.lab.batch_input import batch_command
from bench.lab.cpu_usage import one_of_each, per_request_ms, snapshot
from bench.lab.perf_record import GOAL_TOKENS, batch_record, combine
from bench.lab.request_log import markdown, read, windows
from serve.kosmos2.tiny import write_tiny

ROOT = Path(__file__).resolve().parents[2]
WORKLOAD = [
    "--tasks",
    "caption:1",
    "--resolutions",
    "640x480:1",
    "--formats",
    "jpeg:1",
    "--max-tokens",
    str(GOAL_TOKENS),
    "--ignore-eos",
]


def run(command: list[str], log: Path) -> None:
    """Run one step, its output kept in ``log``; stop the whole run if it fails."""
    print("$", " ".join(command), flush=True)
    began = time.monotonic()
    with log.open("w") as out:
        code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT).returncode
    print(f"  ({time.monotonic() - began:.0f} s)", flush=True)  # each step's seconds, to size a timed run
    if code != 0:
        sys.exit(f"step failed ({code}): see {log}\n" + log.read_text()[-3000:])


def start_service(model: list[str], config: str, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "serve", "run", *model, "--config", config, "--port", str(port)]
    print("$", " ".join(command), flush=True)
    service = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=ROOT)
    began = time.monotonic()
    while time.monotonic() < began + 300:
        if service.poll() is not None:
            sys.exit(f"the service exited ({service.returncode}): see {log}\n" + log.read_text()[-3000:])
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200:
                print(f"  (ready in {time.monotonic() - began:.0f} s)", flush=True)
                return service
        except httpx.HTTPError:
            pass
        time.sleep(1)
    service.terminate()
    sys.exit(f"the service was not ready in 300 s: see {log}")


PROFILED = ("Generator", "engine process", "Ingress", "Preprocessor")
"""Roles whose Python stacks the busiest point's repeat samples (one process each), where py-spy is installed."""


def sample_stacks(out: Path, delay_s: float = 5, seconds: float = 10) -> list[subprocess.Popen]:
    """Start py-spy on one process of each ``PROFILED`` role, ``delay_s`` into the next point, for
    ``seconds``: collapsed stacks in ``py-spy-<role>.txt``, to see what a serial process spends its time on."""
    spy = shutil.which("py-spy", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    if spy is None:
        print("py-spy is not installed: no stack samples", flush=True)
        return []
    samplers = []
    for label, pid in one_of_each(PROFILED).items():
        name = out / f"py-spy-{label.replace(' ', '-')}.txt"
        command = f"sleep {delay_s} && exec {spy} record --nonblocking -r 100 -d {seconds} -f raw -o {name} -p {pid}"
        log = (out / f"py-spy-{label.replace(' ', '-')}.log").open("w")
        samplers.append(subprocess.Popen(["sh", "-c", command], stdout=log, stderr=subprocess.STDOUT))
    return samplers


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lab.perf_run", description=__doc__)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (a smoke run of the script)")
    parser.add_argument("--quick", action="store_true", help="short points and small batches")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--paths",
        default="hf,fast",
        help="engine paths side by side (%(default)s; also fast-eager, fast-sdpa, fast-sync, fast-graphs32)",
    )
    parser.add_argument("--batch-sizes", help="the engine paths' static batches (GPU: 1,64,256,512,1024)")
    parser.add_argument("--concurrency", help="the service's closed-loop clients (GPU: 1,384,768,1024)")
    parser.add_argument("--in-engine", help="closed loops at the engine: requests kept in it (GPU: 384)")
    parser.add_argument("--rates", help="open loops at the engine: arrivals a second (GPU: 500,650)")
    parser.add_argument(
        "--output-lengths", help="measure the engine at each of these exact numbers of new tokens, e.g. 16,32,64,128"
    )
    parser.add_argument(
        "--service-lengths", help="run the service's busiest point again at each of these numbers of new tokens"
    )
    parser.add_argument("--batch", type=int, help="then the batch mode on this many images of the workload")
    parser.add_argument("--no-profile", action="store_true", help="skip where the fast engine's time goes")
    parser.add_argument("--engine-only", action="store_true", help="the engine paths and the profile: no service")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(tempfile.mkdtemp(prefix="kosmos2-"))
    if args.tiny:
        write_tiny(model_dir)
        model, config, batches = ["--model", str(model_dir)], "configs/local.yaml", "1,8"
        concurrency, duration, in_engine, rates = "1,4,16", "4", "8", "4"
    else:
        write_tiny(model_dir, real_size=True)
        model = ["--model", str(model_dir), "--load-format", "dummy"]
        config, batches, concurrency, duration = "configs/perf.yaml", "1,64,256,512,1024", "1,384,768,1024", "15"
        in_engine, rates = "384", "500,650"
    if args.quick:
        batches, concurrency, duration, in_engine, rates = "1,4", "1,8", "3", "4", "4"
    concurrency, in_engine, rates = args.concurrency or concurrency, args.in_engine or in_engine, args.rates or rates
    batches = args.batch_sizes or batches
    if "fast" not in args.paths.split(","):
        parser.error("--paths must include fast, the service's engine")
    python = sys.executable
    engine = [
        python,
        "-m",
        "bench",
        "engine",
        *model,
        "--engine",
        args.paths,
        "--batch-sizes",
        batches,
        "--iterations",
        "3",
        "--concurrency",
        in_engine,
        "--rates",
        rates,
        "--duration",
        "3" if args.tiny or args.quick else "8",
        *WORKLOAD,
        *(["--output-lengths", args.output_lengths] if args.output_lengths else []),
        "--no-progress",
        "--out",
        str(out / "engine"),
    ]
    profile = [
        python,
        "-m",
        "bench.lab.engine_profile",
        *model,
        "--batch-sizes",
        "1,8" if args.tiny or args.quick else "1,1024",
        "--decode-attention",
        "sdpa" if args.tiny else "triton",
        "--compile",
        "off" if args.tiny else "on",
        "--kernels",
        "12",
        "--timeline",
        "--out",
        str(out / "profile.json"),
    ]
    if not args.tiny:
        engine += ["--dtype", "float16"]
        profile += ["--dtype", "float16"]
    run(engine, out / "engine.log")
    steps = [engine]
    if not args.engine_only:
        lengths = [int(n) for n in args.service_lengths.split(",")] if args.service_lengths else []
        steps += measure_service(out, model, config, args.port, duration, concurrency, lengths, tiny=args.tiny)
    if args.batch:
        batch = batch_command(out, model, config, args.batch, GOAL_TOKENS)
        run(batch, out / "batch.log")
        steps.append(batch)
    if not args.no_profile:  # last: the goals' figures come first where time is short
        run(profile, out / "profile.log")
        steps.append(profile)
    perf = combine(out, [" ".join(c) for c in steps], vars(args), with_service=not args.engine_only)
    if args.batch:
        perf |= batch_record(out, perf["headline"])
    (out / "perf.json").write_text(json.dumps(perf, indent=2) + "\n")
    print(json.dumps(perf["headline"], indent=2))


def measure_service(
    out: Path,
    model: list[str],
    config: str,
    port: int,
    duration: str,
    concurrency: str,
    lengths: list[int],
    tiny: bool,
) -> list[list[str]]:
    """The service on this machine: the closed-loop sweep, the open loop at 80% of its peak with the CPU each
    process spends a request, the busiest point again under py-spy, then at each of ``lengths`` new tokens;
    returns the commands run."""
    python = sys.executable
    service = start_service(model, config, port, out / "service.log")
    try:
        url = f"http://127.0.0.1:{port}"
        load = [
            "--url",
            url,
            "--duration",
            duration,
            "--warmup",
            "3",
            "--grace",
            "20",
            "--no-progress",
            "--processes",
            "1" if tiny else "6",
            *WORKLOAD,
            "--engine-baseline",
            str(out / "engine"),
        ]
        sweep = [python, "-m", "bench", "run", "--concurrency", concurrency, *load, "--out", str(out / "service")]
        run(sweep, out / "sweep.log")
        steps = [sweep]
        points = json.loads((out / "service" / "summary.json").read_text())["points"]
        peak = max(point["images_per_s"] for point in points)
        steady = [
            python,
            "-m",
            "bench",
            "run",
            "--rate",
            f"{0.8 * peak:.2f}",
            "--max-in-flight",
            "1024",
            *load,
            "--out",
            str(out / "service-80"),
        ]
        before = snapshot()
        run(steady, out / "steady.log")
        steps.append(steady)
        after = snapshot()
        point = json.loads((out / "service-80" / "summary.json").read_text())["points"][0]
        after["load generator"] = point["sender_cpu_s"]  # over the point only: not its start-up
        cpu = per_request_ms(before, after, point["sent"])  # every request sent, the warm-up's included
        (out / "cpu_per_request.json").write_text(json.dumps(cpu, indent=2) + "\n")
        busiest = max(points, key=lambda point: point["images_per_s"])["concurrency"]
        repeat = [
            python,
            "-m",
            "bench",
            "run",
            "--concurrency",
            str(busiest),
            *load,
            "--out",
            str(out / "service-peak"),
        ]
        samplers = sample_stacks(out)  # what the processes do where the service cannot go faster
        run(repeat, out / "peak.log")
        steps.append(repeat)
        for sampler in samplers:
            sampler.wait(timeout=60)
        for tokens in lengths:  # the busiest point at other answer lengths: the price of an image by its length
            again = [*repeat[:-1], str(out / f"service-{tokens}tokens"), "--max-tokens", str(tokens)]
            run(again, out / f"service-{tokens}tokens.log")
            steps.append(again)
    finally:
        # the engine's log lines (steps/s, batch, busy time, admissions), and every request's line with where
        # its time went, summed up by windows of 5 s in request_timings.md
        for path in Path(tempfile.gettempdir(), "ray", "session_latest", "logs", "serve").glob("replica_*"):
            if "Generator" in path.name or "Ingress" in path.name:
                shutil.copy(path, out / path.name)
        ingress_logs = sorted(out.glob("replica_*Ingress*.log"))
        (out / "request_timings.md").write_text(markdown(windows(read(ingress_logs), seconds=5)))
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=120)
    return steps


if __name__ == "__main__":
    main()

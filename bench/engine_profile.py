"""Where the fast engine's time goes: vision encoding, the admission step (prefill), and decode steps.

    python -m bench.engine_profile --model DIR --load-format dummy --batch-sizes 1,64,256,512 \
        --decode-attention sdpa,triton --compile off,on --out profile.json

For each decode attention, compile setting and batch size it submits that many brief-caption requests (exactly
32 new tokens) to a fresh ``FastEngine`` and times every ``step()`` (the device synchronized before and after),
after one untimed warm-up round that compiles the layers and captures the CUDA graphs; it also times the
engine's vision encoding alone. The admission step holds the vision tower, the prompt prefill and the first
decode step; the other steps are decode steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from serve.config import EngineConfig
from serve.engine import Collector, GenerationRequest
from serve.fastpath import FastEngine
from serve.model import LoadedModel, load_model
from serve.sampling import SamplingParams
from serve.tasks import Task, build_prompt
from serve.text import TextCodec


def synchronize(loaded: LoadedModel) -> None:
    if loaded.device.type == "cuda":
        torch.cuda.synchronize()


def timed(loaded: LoadedModel, work) -> float:
    synchronize(loaded)
    start = time.perf_counter()
    work()
    synchronize(loaded)
    return time.perf_counter() - start


def profile_batch(
    loaded: LoadedModel, batch: int, tokens: int, attention: str, compiled: str
) -> dict[str, float | int | str | bool]:
    """Times of one batch: vision alone, the admission step, and the median decode step (seconds)."""
    codec = TextCodec(loaded.processor)
    ids = codec.encode(build_prompt(Task.CAPTION).text)
    rng = np.random.default_rng(0)
    pixels = [rng.integers(0, 256, (224, 224, 3), dtype=np.uint8) for _ in range(batch)]
    params = SamplingParams(max_new_tokens=tokens, ignore_eos=True)
    requests = [GenerationRequest(p, ids, params) for p in pixels]
    config = EngineConfig(max_batch_size=batch, max_seq_len=128, decode_attention=attention, compile=compiled)
    engine = FastEngine(loaded, config)
    engine.warm_up()
    engine.generate(requests)  # warm-up: kernels chosen, graphs captured
    on_device = torch.from_numpy(np.stack(pixels)).to(loaded.device)
    with torch.inference_mode():
        vision = statistics.median(timed(loaded, lambda: engine.encode(on_device)) for _ in range(3))
    for request in requests:
        engine.submit(request, Collector())
    steps = []
    while engine.has_work:
        steps.append(timed(loaded, engine.step))
    decode = statistics.median(steps[1:])
    return {
        "decode_attention": engine.attention,
        "compiled": engine.steps.compiled,
        "batch_size": batch,
        "vision_s": vision,
        "admission_step_s": steps[0],
        "prefill_text_s": steps[0] - vision - decode,
        "decode_step_s": decode,
        "decode_steps": len(steps) - 1,
        "total_s": sum(steps),
        "images_per_s": batch / sum(steps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.engine_profile", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--load-format", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch-sizes", default="1,64,256,512")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--decode-attention", default="auto", help="comma-separated: auto, sdpa, triton")
    parser.add_argument("--compile", default="auto", help="comma-separated: auto, on, off")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    loaded = load_model(args.model, dtype=args.dtype, load_format=args.load_format)
    rows = [
        profile_batch(loaded, int(batch), args.tokens, attention, compiled)
        for attention in args.decode_attention.split(",")
        for compiled in args.compile.split(",")
        for batch in args.batch_sizes.split(",")
    ]
    name = torch.cuda.get_device_name() if loaded.device.type == "cuda" else "cpu"
    result = {"gpu": name, "dtype": str(loaded.dtype), "tokens": args.tokens, "points": rows}
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for row in rows:
        print(
            f"{row['decode_attention']:6s} compiled {row['compiled']!s:5s} batch {row['batch_size']:4d}: "
            f"vision {row['vision_s'] * 1e3:7.1f} ms, "
            f"text prefill {row['prefill_text_s'] * 1e3:7.1f} ms, decode step {row['decode_step_s'] * 1e3:6.2f} ms, "
            f"{row['images_per_s']:7.1f} images/s"
        )


if __name__ == "__main__":
    main()

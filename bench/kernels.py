"""The fast engine's memory-bound kernels against their alternatives, at the shapes of a 512-image admission and
a 512-row decode step of the real-size model (fp16): the FFN's GELU + layer norm and the vision MLP's quick
GELU (each eager, by Inductor, and by the engine's Triton kernel), and the vision tower's attention under
each SDPA backend. One JSON of milliseconds, with the bandwidth or arithmetic rate each reaches.

    python -m bench.kernels --out kernels.json            # a CUDA GPU
    python -m bench.kernels --out kernels.json --quick    # small shapes (the CPU, with TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from serve.attention import triton_available
from serve.ffn import gelu_layer_norm_reference, launch_gelu_norm, launch_quick_gelu, quick_gelu_reference


def timed_ms(function: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median milliseconds of ``function`` over ``repeats`` runs, after two untimed ones (compiling)."""
    for _ in range(2):
        function()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            began = time.perf_counter()
            function()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def gelu_norm_rows(rows: int, width: int, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """Each way of computing ``layer_norm(gelu(x))`` over ``[rows, width]``."""
    generator = torch.Generator(device=device).manual_seed(0)
    inner = 3 * torch.randn(rows, width, device=device, generator=generator, dtype=torch.float16)
    weight = torch.ones(width, device=device, dtype=torch.float16)
    bias = torch.zeros(width, device=device, dtype=torch.float16)
    out = torch.empty_like(inner)
    kernel = partial(launch_gelu_norm, inner, weight, bias, out, 1e-5)
    return elementwise_ways(
        f"gelu+layer_norm {rows}x{width}",
        gelu_layer_norm_reference,
        kernel,
        (inner, weight, bias, 1e-5),
        device,
        repeats,
    )


def quick_gelu_rows(rows: int, width: int, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """The vision MLP's activation, ``x * sigmoid(1.702 x)`` (the kernel in place; repeated, it stays bounded)."""
    inner = torch.randn(rows, width, device=device, dtype=torch.float16)
    kernel = partial(launch_quick_gelu, inner)
    return elementwise_ways(f"quick_gelu {rows}x{width}", quick_gelu_reference, kernel, (inner,), device, repeats)


def elementwise_ways(
    label: str,
    reference: Callable[..., torch.Tensor],
    kernel: Callable[[], Any],
    args: tuple[Any, ...],
    device: torch.device,
    repeats: int,
) -> list[dict[str, Any]]:
    """``reference(*args)`` eager and compiled by Inductor (CUDA), and the engine's ``kernel`` (where Triton
    runs); bandwidth counts one read and one write of ``args[0]``."""
    ways: dict[str, Callable[[], Any]] = {"eager": lambda: reference(*args)}
    if device.type == "cuda":
        compiled = torch.compile(reference, dynamic=True)
        ways["inductor"] = lambda: compiled(*args)
    if triton_available(device):
        ways["kernel"] = kernel
    moved = 2 * args[0].numel() * args[0].element_size()
    return [_rate(label, name, timed_ms(way, device, repeats), bytes_moved=moved) for name, way in ways.items()]


def vision_attention(batch: int, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """SDPA over the vision tower's 257 positions (16 heads of 64), under each backend that runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(batch, 16, 257, 64, device=device, dtype=torch.float16) for _ in range(3))
    backends = {"default": None}
    if device.type == "cuda":
        backends |= {
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
        }
    flops = 4 * batch * 16 * 257 * 257 * 64
    results = []
    for name, backend in backends.items():

        def attend(backend=backend) -> torch.Tensor:
            with sdpa_kernel(backend) if backend is not None else nullcontext():
                return F.scaled_dot_product_attention(q, k, v)

        try:
            results.append(
                _rate(f"vision sdpa {batch}x16x257x64", name, timed_ms(attend, device, repeats), flops=flops)
            )
        except RuntimeError as exc:  # a backend that does not take these inputs on this card
            results.append({"kernel": f"vision sdpa {batch}x16x257x64", "way": name, "error": str(exc)[:200]})
    return results


def _rate(kernel: str, way: str, ms: float, bytes_moved: int = 0, flops: int = 0) -> dict[str, Any]:
    row: dict[str, Any] = {"kernel": kernel, "way": way, "ms": ms}
    if bytes_moved:
        row["tb_per_s"] = bytes_moved / ms / 1e9
    if flops:
        row["tflop_per_s"] = flops / ms / 1e9
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repeats")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    repeats = 2 if args.quick else args.repeats
    images, prompt, width, vision_width = (2, 71, 256, 64) if args.quick else (512, 71, 8192, 4096)
    with torch.inference_mode():
        rows = [
            *gelu_norm_rows(images * prompt, width, device, repeats),  # an admission's prefill
            *gelu_norm_rows(images, width, device, repeats),  # a decode step
            *quick_gelu_rows(images * 257, vision_width, device, repeats),
            *vision_attention(images, device, repeats),
        ]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    args.out.write_text(json.dumps({"gpu": name, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    for row in rows:
        rate = f"{row['tb_per_s']:.2f} TB/s" if "tb_per_s" in row else f"{row.get('tflop_per_s', 0):.0f} TFLOP/s"
        print(
            f"{row['kernel']:32s} {row['way']:18s} " + (f"{row['ms']:8.3f} ms  {rate}" if "ms" in row else row["error"])
        )


if __name__ == "__main__":
    main()

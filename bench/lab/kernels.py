"""The fast engine's memory-bound kernels against their alternatives, at the shapes of a 512-image admission and
a 512-row decode step of the real-size model (fp16): the FFN's GELU + layer norm and the vision MLP's quick
GELU (each eager, by Inductor, and by the engine's Triton kernel; the first also at 4, 8 and 32 warps), the
vision tower's attention (also at 256 positions, whole tiles) and the prompt prefill's under each SDPA backend,
a residual add with the layer norm after it (eager, and compiled with dynamic or static sizes), the vision
embeddings (the model's normalization and convolution against the engine's one matrix product), the
image-to-text projection (the model's module against the engine's, dense folded in), and the feed-forward
blocks' second projection with its residual (a product then an add, against the residual added in the
product's epilogue). One JSON of milliseconds, with the bandwidth or arithmetic rate each reaches.

    python -m bench.lab.kernels --out kernels.json            # a CUDA GPU
    python -m bench.lab.kernels --out kernels.json --quick    # small shapes (the CPU, with TRITON_INTERPRET=1)
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

from serve.engine.fast.layers import ImageProjection, PatchEmbedding, add_projection_, image_to_text, vision_embeddings
from serve.engine.kernels.attention import triton_available
from serve.engine.kernels.ffn import (
    gelu_layer_norm_reference,
    launch_gelu_norm,
    launch_quick_gelu,
    quick_gelu_reference,
)
from serve.engine.model import make_projection_bidirectional

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
"""The processor's normalization (Kosmos-2's, CLIP's)."""


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
    label = f"gelu+layer_norm {rows}x{width}"
    kernel = partial(launch_gelu_norm, inner, weight, bias, out, 1e-5)
    found = elementwise_ways(label, gelu_layer_norm_reference, kernel, (inner, weight, bias, 1e-5), device, repeats)
    if triton_available(device):  # the kernel at other warp counts than its default (one per 512 columns)
        for warps in (4, 8, 32):
            way = partial(launch_gelu_norm, inner, weight, bias, out, 1e-5, warps)
            found.append(_rate(label, f"kernel {warps} warps", timed_ms(way, device, repeats), 2 * inner.nbytes))
    return found


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


def attention_backends(
    kind: str, batch: int, heads: int, length: int, device: torch.device, repeats: int
) -> list[dict[str, Any]]:
    """SDPA under each backend that runs, over ``length`` positions of ``heads`` heads of 64: the vision tower's
    (``kind`` ``vision``, bidirectional) or an admission's prompt prefill (``prefill``, causal)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(batch, heads, length, 64, device=device, dtype=torch.float16) for _ in range(3))
    backends = {"default": None}
    if device.type == "cuda":
        backends |= {
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH,
        }
    causal = kind == "prefill"
    flops = 4 * batch * heads * length * length * 64 // (2 if causal else 1)
    label = f"{kind} sdpa {batch}x{heads}x{length}x64"
    results = []
    for name, backend in backends.items():

        def attend(backend=backend) -> torch.Tensor:
            with sdpa_kernel(backend) if backend is not None else nullcontext():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        try:
            results.append(_rate(label, name, timed_ms(attend, device, repeats), flops=flops))
        except RuntimeError as exc:  # a backend that does not take these inputs on this card
            results.append({"kernel": label, "way": name, "error": str(exc)[:200]})
    return results


def add_layer_norm(rows: int, width: int, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """``layer_norm(hidden + delta)`` (a residual add and the next layer norm, both outputs kept) eager, and by
    Inductor compiled with every size dynamic (as the engine's layers are) and with the sizes of this call: the
    compiled layers' layer norms ran as looped (``red``) kernels in one profile, persistent (``per``) in another."""
    hidden, delta = (torch.randn(rows, width, device=device, dtype=torch.float16) for _ in range(2))
    norm = torch.nn.LayerNorm(width, device=device, dtype=torch.float16)

    def reference(hidden: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        summed = hidden + delta
        return summed, norm(summed)

    ways: dict[str, Callable[[], Any]] = {"eager": lambda: reference(hidden, delta)}
    if device.type == "cuda":
        dynamic, static = torch.compile(reference, dynamic=True), torch.compile(reference, dynamic=False)
        ways |= {"inductor dynamic": lambda: dynamic(hidden, delta), "inductor static": lambda: static(hidden, delta)}
    moved = 4 * hidden.numel() * hidden.element_size()
    label = f"add+layer_norm {rows}x{width}"
    return [_rate(label, name, timed_ms(way, device, repeats), bytes_moved=moved) for name, way in ways.items()]


def patch_embedding(images: int, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """The vision tower's embeddings and first layer norm from ``images`` uint8 224x224 pixels: the model's way
    (normalize channels-first, the patch convolution, the class row, the positions), and the engine's
    :func:`serve.engine.fast.layers.vision_embeddings`, eager and compiled (CUDA)."""
    from transformers import Kosmos2VisionConfig
    from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2VisionEmbeddings

    config = Kosmos2VisionConfig()
    embeddings = Kosmos2VisionEmbeddings(config).to(device=device, dtype=torch.float16).eval()
    norm = torch.nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps).to(device=device, dtype=torch.float16)
    mean, std = (torch.tensor(values, device=device) for values in (CLIP_MEAN, CLIP_STD))
    patches = PatchEmbedding.of(embeddings, mean, std, 1 / 255)
    pixels = torch.randint(0, 256, (images, 224, 224, 3), dtype=torch.uint8, device=device)

    def model_way() -> torch.Tensor:
        values = pixels.permute(0, 3, 1, 2).float() * (1 / 255)
        return norm(embeddings(((values - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).half()))

    ways: dict[str, Callable[[], Any]] = {"model": model_way}
    ways["engine"] = lambda: vision_embeddings(patches, norm, pixels)
    if device.type == "cuda":
        compiled = torch.compile(vision_embeddings, dynamic=True)
        ways["engine compiled"] = lambda: compiled(patches, norm, pixels)
    flops = 2 * images * 256 * patches.weight.shape[1] * config.hidden_size
    return _against_model(f"vision embeddings {images}x224x224", ways, device, repeats, flops=flops)


def image_projection(images: int, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """The image-to-text projection of ``images`` images' vision features: the model's module, and the engine's
    ``image_to_text`` (``serve.engine.fast.layers``: dense folded into the keys and values, the latents'
    projections once)."""
    from transformers import Kosmos2Config
    from transformers.models.kosmos2.modeling_kosmos2 import Kosmos2ImageToTextProjection

    config = Kosmos2Config()
    module = Kosmos2ImageToTextProjection(config).to(device=device, dtype=torch.float16).eval()
    make_projection_bidirectional(module)
    projection = ImageProjection.of(module)
    width = config.vision_config.hidden_size
    features = F.normalize(torch.randn(images, 257, width, device=device), dim=-1).half()
    ways = {"model": lambda: module(features)[0], "engine": lambda: image_to_text(projection, features)}
    return _against_model(f"image projection {images}x257x{width}", ways, device, repeats)


def residual_projection(rows: int, inner: int, width: int, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """``hidden + fc2(inner)`` over ``rows`` (a feed-forward block's second projection and residual): the
    module's product with its bias then an add, against the bias in the residual and the residual added by the
    product (``serve.engine.fast.layers.add_projection_``, in place: repeated, the residual grows by a unit-scale
    term)."""
    generator = torch.Generator(device=device).manual_seed(0)
    activations = torch.randn(rows, inner, device=device, generator=generator, dtype=torch.float16)
    weight = torch.randn(width, inner, device=device, generator=generator, dtype=torch.float16) / inner**0.5
    bias = torch.zeros(width, device=device, dtype=torch.float16)
    residual = torch.zeros(rows, width, device=device, dtype=torch.float16)
    ways = {
        "product + add": lambda: residual + F.linear(activations, weight, bias),
        "epilogue": lambda: add_projection_(residual, activations, weight),
    }
    label = f"fc2+residual {rows}x{inner}->{width}"
    flops = 2 * rows * inner * width
    return [_rate(label, name, timed_ms(way, device, repeats), flops=flops) for name, way in ways.items()]


def _against_model(
    label: str, ways: dict[str, Callable[[], torch.Tensor]], device: torch.device, repeats: int, flops: int = 0
) -> list[dict[str, Any]]:
    """Each way timed, with its largest difference from the ``model`` way's output."""
    expected = ways["model"]().float()
    return [
        _rate(label, name, timed_ms(way, device, repeats), flops=flops)
        | {"max_abs_diff": (way().float() - expected).abs().max().item()}
        for name, way in ways.items()
    ]


def _rate(kernel: str, way: str, ms: float, bytes_moved: int = 0, flops: int = 0) -> dict[str, Any]:
    row: dict[str, Any] = {"kernel": kernel, "way": way, "ms": ms}
    if bytes_moved:
        row["tb_per_s"] = bytes_moved / ms / 1e9
    if flops:
        row["tflop_per_s"] = flops / ms / 1e9
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.lab.kernels", description=__doc__)
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
            *attention_backends("vision", images, 16, 257, device, repeats),
            # 256 positions fill whole tiles: the gap to 257 bounds what attending the class token apart could save
            *attention_backends("vision", images, 16, 256, device, repeats),
            *attention_backends("prefill", images, 32, prompt + 1, device, repeats),
            *add_layer_norm(images * 257, vision_width // 4, device, repeats),
            *add_layer_norm(images * (prompt + 1), width // 4, device, repeats),
            *patch_embedding(images, device, repeats),
            *image_projection(images, device, repeats),
            *residual_projection(images * 257, vision_width, vision_width // 4, device, repeats),
            *residual_projection(images * prompt, width, width // 4, device, repeats),
        ]
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    args.out.write_text(json.dumps({"gpu": name, "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    for row in rows:
        rate = f"{row['tb_per_s']:.2f} TB/s" if "tb_per_s" in row else ""
        rate = f"{row['tflop_per_s']:.0f} TFLOP/s" if "tflop_per_s" in row else rate
        print(
            f"{row['kernel']:36s} {row['way']:18s} " + (f"{row['ms']:8.3f} ms  {rate}" if "ms" in row else row["error"])
        )


if __name__ == "__main__":
    main()

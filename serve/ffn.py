"""The middle of the text decoder's feed-forward block (``Kosmos2TextFFN``): GELU, then the block's own layer
norm (``ffn_layernorm``), between its two matrix products.

:func:`gelu_layer_norm` runs one Triton kernel on CUDA: a program per row reads the row in chunks for its
statistics, then again (from cache) to write it normalized, the exact (erf) GELU and the norm in float32.
Elsewhere it runs :func:`gelu_layer_norm_reference`, the model's own two operations. On an H200, Inductor's
fused kernel for the pair took 36 ms of a 393 ms admission of 512 images (eager's two kernels about 21 ms);
reading and writing the 8,192-wide rows once is about 6 ms of memory traffic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serve.attention import triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: the reference serves
    triton = None

CHUNK = 2048
"""Columns a program holds at a time: it streams a row in chunks (statistics first, then the normalized
output), so that few registers a row let many rows be in flight on each multiprocessor."""


def gelu_layer_norm(inner: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``layer_norm(gelu(inner))`` over the last dimension, GELU exact (erf), statistics in float32."""
    if not triton_available(inner.device):
        return gelu_layer_norm_reference(inner, weight, bias, eps)
    rows = inner.reshape(-1, inner.shape[-1]).contiguous()  # a view of the projection's output: no copy
    out = torch.empty_like(rows)
    launch_gelu_norm(rows, weight, bias, out, eps, min(CHUNK, triton.next_power_of_2(rows.shape[1])))
    return out.view(inner.shape)


def launch_gelu_norm(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, eps: float, chunk: int
) -> None:
    """The kernel over contiguous ``[R, W]`` ``rows`` into ``out``, ``chunk`` (a power of two) columns at a
    time, a warp per 256 of them."""
    _gelu_norm_kernel[(rows.shape[0],)](
        rows, weight, bias, out, rows.shape[1], eps, CHUNK=chunk, num_warps=max(1, min(16, chunk // 256))
    )


def gelu_layer_norm_reference(
    inner: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """The two operations as the Hugging Face module runs them."""
    return F.layer_norm(F.gelu(inner), (inner.shape[-1],), weight, bias, eps)


if triton is not None:

    @triton.jit
    def _gelu(x):
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))

    @triton.jit
    def _gelu_norm_kernel(in_ptr, weight_ptr, bias_ptr, out_ptr, width, eps, CHUNK: tl.constexpr):
        """One row of ``width`` (rows are contiguous): GELU, then layer norm with the weight and bias, in float32.
        The first pass merges each chunk's mean and squared deviations into the row's (Chan et al.), the second
        reads the row again (from cache) to write it normalized."""
        base = tl.program_id(0).to(tl.int64) * width
        cols = tl.arange(0, CHUNK)
        count = 0.0
        mean = 0.0
        squares = 0.0
        for start in range(0, width, CHUNK):
            inside = start + cols < width
            x = tl.load(in_ptr + base + start + cols, mask=inside, other=0.0).to(tl.float32)
            taken = tl.minimum(width - start, CHUNK).to(tl.float32)
            activated = _gelu(x)
            chunk_mean = tl.sum(activated, axis=0) / taken
            centred = tl.where(inside, activated - chunk_mean, 0.0)
            total = count + taken
            delta = chunk_mean - mean
            mean += delta * taken / total
            squares += tl.sum(centred * centred, axis=0) + delta * delta * count * taken / total
            count = total
        scale = 1.0 / tl.sqrt(squares / width + eps)
        for start in range(0, width, CHUNK):
            inside = start + cols < width
            x = tl.load(in_ptr + base + start + cols, mask=inside, other=0.0).to(tl.float32)
            weight = tl.load(weight_ptr + start + cols, mask=inside, other=0.0).to(tl.float32)
            bias = tl.load(bias_ptr + start + cols, mask=inside, other=0.0).to(tl.float32)
            normed = (_gelu(x) - mean) * scale * weight + bias
            tl.store(out_ptr + base + start + cols, normed.to(out_ptr.dtype.element_ty), mask=inside)

"""The elementwise middles of the feed-forward blocks, between their two matrix products: the text decoder's
GELU and its own layer norm (``Kosmos2TextFFN.ffn_layernorm``), and the vision tower's quick GELU.

:func:`gelu_layer_norm` runs one Triton kernel on CUDA: a program per row reads the whole row into registers,
applies the exact (erf) GELU and the layer norm in float32, and writes it once. Elsewhere it runs
:func:`gelu_layer_norm_reference`, the model's own two operations. The arithmetic of ``erf``, more than memory
traffic, bounds this work, so the kernel holds the row and computes each GELU once rather than streaming the
row twice. Per layer of a 512-image admission's prefill (36,352 rows of 8,192) on an H200 it takes about
0.74 ms, eager's two kernels 0.86 and Inductor's fusion of them 1.7 (``python -m bench.lab.kernels`` times them).

:func:`quick_gelu_` applies ``x * sigmoid(1.702 x)`` in place, one read and one write in float32 registers (on
CUDA a Triton kernel, elsewhere the model's own expression). Reading and writing a 512-image admission's
131,584 x 4,096 activations once takes about 0.45 ms a layer at an H200's 4.8 TB/s; Inductor's fusion of the
activation inside the compiled vision layer moves about 2.0 TB/s (1.1 ms a layer), hence a kernel of its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from serve.engine.kernels.attention import triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: the reference serves
    triton = None

QUICK_BLOCK = 4096
"""Elements per program of the quick GELU kernel (16 a thread at 8 warps: two 16-byte loads of fp16)."""

MAX_WIDTH = 16384
"""The widest row the kernel holds in registers (Kosmos-2's FFN is 8,192 wide); wider rows take the reference."""


def gelu_layer_norm(inner: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """``layer_norm(gelu(inner))`` over the last dimension, GELU exact (erf), statistics in float32."""
    if not triton_available(inner.device) or inner.shape[-1] > MAX_WIDTH:
        return gelu_layer_norm_reference(inner, weight, bias, eps)
    rows = inner.reshape(-1, inner.shape[-1]).contiguous()  # a view of the projection's output: no copy
    out = torch.empty_like(rows)
    launch_gelu_norm(rows, weight, bias, out, eps)
    return out.view(inner.shape)


def launch_gelu_norm(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, out: torch.Tensor, eps: float, warps: int = 0
) -> None:
    """The kernel over contiguous ``[R, W]`` ``rows`` into ``out``: a program a row, ``warps`` warps (by default
    one per 512 columns, at most 16)."""
    block = triton.next_power_of_2(rows.shape[1])
    warps = warps or min(16, max(1, block // 512))
    _gelu_norm_kernel[(rows.shape[0],)](rows, weight, bias, out, rows.shape[1], eps, BLOCK=block, num_warps=warps)


def quick_gelu_(inner: torch.Tensor) -> torch.Tensor:
    """``inner * sigmoid(1.702 * inner)`` written over ``inner`` (contiguous), which is returned."""
    if not triton_available(inner.device) or not inner.is_contiguous():
        return inner.copy_(quick_gelu_reference(inner))
    launch_quick_gelu(inner)
    return inner


def launch_quick_gelu(inner: torch.Tensor) -> None:
    """The in-place kernel over contiguous ``inner``, ``QUICK_BLOCK`` elements a program."""
    _quick_gelu_kernel[(triton.cdiv(inner.numel(), QUICK_BLOCK),)](inner, inner.numel(), BLOCK=QUICK_BLOCK, num_warps=8)


def quick_gelu_reference(inner: torch.Tensor) -> torch.Tensor:
    """The activation as the Hugging Face module computes it (``QuickGELUActivation``)."""
    return inner * torch.sigmoid(1.702 * inner)


def gelu_layer_norm_reference(
    inner: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float
) -> torch.Tensor:
    """The two operations as the Hugging Face module runs them."""
    return F.layer_norm(F.gelu(inner), (inner.shape[-1],), weight, bias, eps)


if triton is not None:

    @triton.jit
    def _gelu_norm_kernel(in_ptr, weight_ptr, bias_ptr, out_ptr, width, eps, BLOCK: tl.constexpr):
        """One row of ``width`` (rows are contiguous): GELU, then layer norm with the weight and bias, all in
        float32 registers."""
        base = tl.program_id(0).to(tl.int64) * width
        cols = tl.arange(0, BLOCK)
        inside = cols < width
        x = tl.load(in_ptr + base + cols, mask=inside, other=0.0).to(tl.float32)
        activated = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
        mean = tl.sum(activated, axis=0) / width
        centred = tl.where(inside, activated - mean, 0.0)
        variance = tl.sum(centred * centred, axis=0) / width
        weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        bias = tl.load(bias_ptr + cols, mask=inside, other=0.0).to(tl.float32)
        normed = centred / tl.sqrt(variance + eps) * weight + bias
        tl.store(out_ptr + base + cols, normed.to(out_ptr.dtype.element_ty), mask=inside)

    @triton.jit
    def _quick_gelu_kernel(ptr, count, BLOCK: tl.constexpr):
        """``BLOCK`` elements of a flat tensor, in place: ``x * sigmoid(1.702 x)`` in float32."""
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < count
        x = tl.load(ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        tl.store(ptr + offsets, (x * tl.sigmoid(1.702 * x)).to(ptr.dtype.element_ty), mask=inside)

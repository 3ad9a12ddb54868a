"""The feed-forward blocks' middles, GELU + layer norm and the vision tower's quick GELU: the Triton kernels (in
Triton's interpreter on the CPU, and on a GPU where there is one) against the same operations in float64, and
the fast engine's layer against the Hugging Face module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers.activations import QuickGELUActivation

from serve.engine.fast.layers import LayerSteps
from serve.engine.kernels.ffn import gelu_layer_norm, gelu_layer_norm_reference, quick_gelu_, quick_gelu_reference
from tests.helpers import run_interpreted

# name: (shape, dtype): Kosmos-2's width (a power of two), and widths the kernel's block masks
CASES = {
    "kosmos_fp32": ((2, 3, 8192), torch.float32),
    "kosmos_fp16": ((5, 8192), torch.float16),
    "ragged_fp32": ((3, 5000), torch.float32),
    "masked_fp32": ((4, 7, 96), torch.float32),
}

INTERPRETER_SCRIPT = """
import sys, torch
from serve.engine.kernels.attention import triton_available
from serve.engine.kernels.ffn import gelu_layer_norm, quick_gelu_
from tests.engine.test_ffn import CASES, make_case
assert triton_available("cpu")
results = {name: gelu_layer_norm(*make_case(name)) for name in CASES}
results |= {f"quick_{name}": quick_gelu_(make_case(name)[0]) for name in CASES}
torch.save(results, sys.argv[1])
"""


def make_case(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Seeded inputs ``(inner, weight, bias, eps)`` with the spread of an FFN's first projection."""
    shape, dtype = CASES[name]
    generator = torch.Generator().manual_seed(list(CASES).index(name))
    inner = (3 * torch.randn(shape, generator=generator)).to(dtype)
    weight = (1 + 0.1 * torch.randn(shape[-1], generator=generator)).to(dtype)
    bias = (0.1 * torch.randn(shape[-1], generator=generator)).to(dtype)
    return inner, weight, bias, 1e-5


def exact(inner: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """The operations in float64 on the same inputs."""
    return gelu_layer_norm_reference(inner.double(), weight.double(), bias.double(), eps)


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-3, "rtol": 2e-3}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    return run_interpreted(INTERPRETER_SCRIPT, tmp_path_factory.mktemp("ffn") / "out.pt")


@pytest.mark.parametrize("name", CASES)
def test_kernel_matches_float64(interpreted: dict[str, torch.Tensor], name: str) -> None:
    inputs = make_case(name)
    out = interpreted[name]
    assert out.dtype == inputs[0].dtype and out.shape == inputs[0].shape
    torch.testing.assert_close(out.double(), exact(*inputs), **tolerance(inputs[0].dtype))


@pytest.mark.parametrize("name", CASES)
def test_reference_is_the_modules_operations(name: str) -> None:
    inner, weight, bias, eps = make_case(name)
    norm = torch.nn.LayerNorm(inner.shape[-1], eps=eps, dtype=inner.dtype)
    norm.weight.data, norm.bias.data = weight, bias
    assert torch.equal(gelu_layer_norm(inner, weight, bias, eps), norm(F.gelu(inner)))  # on the CPU: the reference


@pytest.mark.parametrize("name", CASES)
def test_quick_gelu_kernel_matches_float64(interpreted: dict[str, torch.Tensor], name: str) -> None:
    inner = make_case(name)[0]
    out = interpreted[f"quick_{name}"]
    assert out.dtype == inner.dtype and out.shape == inner.shape
    torch.testing.assert_close(out.double(), quick_gelu_reference(inner.double()), **tolerance(inner.dtype))


def test_quick_gelu_reference_is_the_modules_in_place() -> None:
    inner = make_case("kosmos_fp16")[0]
    expected = QuickGELUActivation()(inner)
    out = quick_gelu_(inner)  # on the CPU: the reference, written over its input
    assert out.data_ptr() == inner.data_ptr() and torch.equal(out, expected)


def test_layer_output_equals_the_hugging_face_layer(tiny_dir: Path) -> None:
    """Attention output, residual and feed-forward block as the engine composes them (the kernel's reference on
    the CPU, the second projection adding the residual) equal the module's own arithmetic on the same inputs, to
    float32's rounding (the bias joins the residual before the product, not after)."""
    from serve.engine.model import load_model

    layer = load_model(tiny_dir, device="cpu").model.text_model.model.layers[0]
    generator = torch.Generator().manual_seed(3)
    width = layer.self_attn.out_proj.in_features
    hidden, mixed = (torch.randn(2, 5, width, generator=generator) for _ in range(2))
    with torch.no_grad():
        after_attention = hidden + layer.self_attn.out_proj(layer.self_attn.inner_attn_ln(mixed))
        expected = after_attention + layer.ffn(layer.final_layer_norm(after_attention))
        got = LayerSteps().layer_output(layer, hidden, mixed)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_cuda_kernel_matches_float64(name: str) -> None:
    pytest.importorskip("triton")
    inputs = make_case(name)
    out = gelu_layer_norm(*(x.cuda() if isinstance(x, torch.Tensor) else x for x in inputs))
    assert out.dtype == inputs[0].dtype and out.shape == inputs[0].shape
    torch.testing.assert_close(out.cpu().double(), exact(*inputs), **tolerance(inputs[0].dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_cuda_quick_gelu_matches_float64(name: str) -> None:
    pytest.importorskip("triton")
    inner = make_case(name)[0]
    out = quick_gelu_(inner.cuda())
    torch.testing.assert_close(out.cpu().double(), quick_gelu_reference(inner.double()), **tolerance(inner.dtype))

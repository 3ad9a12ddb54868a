"""Decode attention: the Triton kernel (in Triton's interpreter, on the CPU) against the reference, and the
reference against a naive softmax."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from serve import attention
from serve.attention import decode_attention, decode_attention_reference, triton_available

ROOT = Path(__file__).resolve().parents[2]

# name: (slots, heads, max length, head_dim, lengths (one per row), dtype); BLOCK_N is 16
CASES = {
    "mixed_fp32": (6, 3, 48, 64, [1, 21, 32, 48], torch.float32),
    "mixed_fp16": (6, 3, 48, 64, [1, 21, 32, 48], torch.float16),
    "dim16_fp32": (3, 2, 40, 16, [16, 5, 40], torch.float32),
}

# Runs the kernel for every case in a fresh process, where TRITON_INTERPRET=1 holds before Triton decorates it.
INTERPRETER_SCRIPT = """
import sys, torch
from serve.attention import decode_attention, triton_available
from tests.unit.test_attention import CASES, make_case
assert triton_available("cpu")
torch.save({name: decode_attention(*make_case(name)) for name in CASES}, sys.argv[1])
"""


def make_case(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Seeded inputs with garbage in the cache beyond each row's length and in the slots no row reads."""
    slots, heads, length, head_dim, lengths, dtype = CASES[name]
    generator = torch.Generator().manual_seed(list(CASES).index(name))
    batch = len(lengths)
    query = torch.randn(batch, heads, head_dim, generator=generator).to(dtype)
    keys = torch.randn(slots, heads, length, head_dim, generator=generator).to(dtype)
    values = torch.randn(slots, heads, length, head_dim, generator=generator).to(dtype)
    huge = torch.finfo(dtype).max
    for row, n in enumerate(lengths):
        keys[row, :, n:] = huge
        values[row, :, n:] = float("nan")
    keys[batch:], values[batch:] = float("nan"), huge
    return query, keys, values, torch.tensor(lengths), head_dim**-0.5


def naive(query, keys, values, lengths, scale) -> torch.Tensor:
    """Explicit softmax over q·k in float64, one (row, head) at a time."""
    out = torch.empty(query.shape, dtype=torch.float64)
    for row, n in enumerate(lengths.tolist()):
        for head in range(query.shape[1]):
            scores = keys[row, head, :n].double() @ query[row, head].double() * scale
            weights = torch.exp(scores - scores.max())
            out[row, head] = (weights / weights.sum()) @ values[row, head, :n].double()
    return out


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    return {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 1e-3, "rtol": 1e-3}


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    # Older interpreters (Triton 3.6 with numpy 2.5) fail to take a loaded scalar as the loop's bound.
    pytest.importorskip("triton", minversion="3.9")
    path = tmp_path_factory.mktemp("attention") / "out.pt"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT, str(path)], cwd=ROOT, env=env, check=True, timeout=300)
    return torch.load(path)


@pytest.mark.parametrize("name", CASES)
def test_kernel_matches_reference(interpreted: dict[str, torch.Tensor], name: str) -> None:
    inputs = make_case(name)
    out = interpreted[name]
    assert out.dtype == inputs[0].dtype and out.shape == inputs[0].shape
    torch.testing.assert_close(out, decode_attention_reference(*inputs), **tolerance(inputs[0].dtype))


@pytest.mark.parametrize("name", CASES)
def test_reference_matches_naive(name: str) -> None:
    inputs = make_case(name)
    out = decode_attention_reference(*inputs)
    assert out.dtype == inputs[0].dtype
    torch.testing.assert_close(out.double(), naive(*inputs), **tolerance(inputs[0].dtype))


def test_cpu_falls_back_to_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_available("cpu")
    assert triton_available("cuda") == (attention.triton is not None)
    inputs = make_case("mixed_fp32")
    torch.testing.assert_close(decode_attention(*inputs), decode_attention_reference(*inputs), atol=0, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", CASES)
def test_cuda_kernel_replays_in_a_graph(name: str) -> None:
    """Captured once with every length 1, replayed after the lengths change on the device."""
    pytest.importorskip("triton")
    query, keys, values, lengths, scale = make_case(name)
    query, keys, values, lengths = (x.cuda() for x in (query, keys, values, lengths))
    visible = torch.ones_like(lengths)
    decode_attention(query, keys, values, visible, scale)  # compiles outside the graph
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(query, keys, values, visible, scale)
    visible.copy_(lengths)
    graph.replay()
    expected = decode_attention_reference(query, keys, values, lengths, scale)
    torch.testing.assert_close(out, expected, **tolerance(query.dtype))

"""Decode attention: the Triton kernel (in Triton's interpreter, on the CPU) against the reference, and the
reference against a naive softmax; both write each row's new key and value into its slot. The admission's
cache write likewise."""

from __future__ import annotations

import pytest
import torch

from serve.engine.fast.layers import split_heads
from serve.engine.kernels import attention
from serve.engine.kernels.attention import decode_attention, decode_attention_reference, triton_available, write_cache
from tests.helpers import run_interpreted

# name: (slots, heads, max length, head_dim, lengths (one per row), dtype); BLOCK_N is 16
CASES = {
    "mixed_fp32": (6, 3, 48, 64, [1, 21, 32, 48], torch.float32),
    "mixed_fp16": (6, 3, 48, 64, [1, 21, 32, 48], torch.float16),
    "dim16_fp32": (3, 2, 40, 16, [16, 5, 40], torch.float32),
}

# Runs the kernel for every case in a fresh process, where TRITON_INTERPRET=1 holds before Triton decorates it.
INTERPRETER_SCRIPT = """
import sys, torch
from serve.engine.kernels.attention import decode_attention, triton_available, write_cache
from tests.engine.test_attention import CASES, WRITE_DTYPES, make_case, make_write_case
assert triton_available("cpu")
results = {}
for name in CASES:
    inputs = make_case(name)
    results[name] = decode_attention(*inputs), inputs[3], inputs[4]
for dtype in WRITE_DTYPES:
    keys, values, key, value, slots = make_write_case(dtype)
    write_cache(keys, values, key, value, slots)
    results[f"write_{dtype}"] = keys, values
torch.save(results, sys.argv[1])
"""

WRITE_DTYPES = (torch.float32, torch.float16)


def make_write_case(dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """A cache of 5 slots and 3 prompts of 37 positions (more than one block) from a fused projection, as the
    admission's keys and values are: strided views, not contiguous tensors."""
    generator = torch.Generator().manual_seed(7)
    keys, values = (torch.randn(5, 2, 48, 16, generator=generator).to(dtype) for _ in range(2))
    projected = torch.randn(3, 37, 3 * 2 * 16, generator=generator).to(dtype)
    _, key, value = (split_heads(part, 16) for part in projected.chunk(3, dim=-1))
    return keys, values, key, value, torch.tensor([4, 0, 2])


Case = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]


def make_case(name: str) -> Case:
    """Seeded inputs (query, new key, new value, keys, values, lengths, scale) with garbage in the cache from
    each row's new position on (which the new key and value must replace) and in the slots no row reads."""
    slots, heads, length, head_dim, lengths, dtype = CASES[name]
    generator = torch.Generator().manual_seed(list(CASES).index(name))
    batch = len(lengths)
    query, key, value = (torch.randn(batch, heads, head_dim, generator=generator).to(dtype) for _ in range(3))
    keys = torch.randn(slots, heads, length, head_dim, generator=generator).to(dtype)
    values = torch.randn(slots, heads, length, head_dim, generator=generator).to(dtype)
    huge = torch.finfo(dtype).max
    for row, n in enumerate(lengths):
        keys[row, :, n - 1 :] = huge
        values[row, :, n - 1 :] = float("nan")
    keys[batch:], values[batch:] = float("nan"), huge
    return query, key, value, keys, values, torch.tensor(lengths), head_dim**-0.5


def written(inputs: Case) -> tuple[torch.Tensor, torch.Tensor]:
    """The cache as it must be after the call: the inputs' cache with each new key and value at its place."""
    _, key, value, keys, values, lengths, _ = inputs
    keys, values = keys.clone(), values.clone()
    for row, n in enumerate(lengths.tolist()):
        keys[row, :, n - 1], values[row, :, n - 1] = key[row], value[row]
    return keys, values


def naive(query, keys, values, lengths, scale) -> torch.Tensor:
    """Explicit softmax over q·k in float64, one (row, head) at a time, over a written cache."""
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
    return run_interpreted(INTERPRETER_SCRIPT, tmp_path_factory.mktemp("attention") / "out.pt")


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal element for element, NaN where the other is NaN."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


@pytest.mark.parametrize("name", CASES)
def test_kernel_matches_reference(interpreted: dict[str, tuple[torch.Tensor, ...]], name: str) -> None:
    inputs = make_case(name)
    out, keys, values = interpreted[name]
    assert out.dtype == inputs[0].dtype and out.shape == inputs[0].shape
    torch.testing.assert_close(out, decode_attention_reference(*inputs), **tolerance(inputs[0].dtype))
    expected_keys, expected_values = written(make_case(name))
    assert same(keys, expected_keys) and same(values, expected_values)


@pytest.mark.parametrize("name", CASES)
def test_reference_matches_naive(name: str) -> None:
    inputs = make_case(name)
    out = decode_attention_reference(*inputs)
    query, _, _, keys, values, lengths, scale = inputs
    assert out.dtype == query.dtype
    expected_keys, expected_values = written(make_case(name))
    assert same(keys, expected_keys) and same(values, expected_values)
    torch.testing.assert_close(out.double(), naive(query, keys, values, lengths, scale), **tolerance(query.dtype))


def test_cpu_falls_back_to_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not triton_available("cpu")
    assert triton_available("cuda") == (attention.triton is not None)
    got, expected = decode_attention(*make_case("mixed_fp32")), decode_attention_reference(*make_case("mixed_fp32"))
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("name", CASES)
def test_cuda_kernel_replays_in_a_graph(name: str) -> None:
    """Captured once with every length 1, replayed after the lengths change on the device."""
    pytest.importorskip("triton")
    query, key, value, keys, values, lengths, scale = make_case(name)
    query, key, value, keys, values, lengths = (x.cuda() for x in (query, key, value, keys, values, lengths))
    expected = decode_attention_reference(query, key, value, keys.clone(), values.clone(), lengths, scale)
    ones = torch.ones_like(lengths)
    decode_attention(query, key, value, keys.clone(), values.clone(), ones, scale)  # compiles outside the graph
    graph = torch.cuda.CUDAGraph()
    visible = ones.clone()
    with torch.cuda.graph(graph):
        out = decode_attention(query, key, value, keys, values, visible, scale)
    visible.copy_(lengths)
    graph.replay()
    torch.testing.assert_close(out, expected, **tolerance(query.dtype))


@pytest.mark.parametrize("dtype", WRITE_DTYPES)
def test_write_kernel_matches_indexing(interpreted: dict[str, tuple[torch.Tensor, ...]], dtype) -> None:
    keys, values, key, value, slots = make_write_case(dtype)
    assert not key.is_contiguous()
    expected_keys, expected_values = keys.clone(), values.clone()
    expected_keys[slots, :, :37], expected_values[slots, :, :37] = key, value
    got_keys, got_values = interpreted[f"write_{dtype}"]
    assert torch.equal(got_keys, expected_keys) and torch.equal(got_values, expected_values)
    write_cache(keys, values, key, value, slots)  # here without Triton: the indexed assignment itself
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", WRITE_DTYPES)
def test_cuda_write_kernel_matches_indexing(dtype) -> None:
    pytest.importorskip("triton")
    keys, values, key, value, slots = (x.cuda() for x in make_write_case(dtype))
    expected_keys, expected_values = keys.clone(), values.clone()
    expected_keys[slots, :, :37], expected_values[slots, :, :37] = key, value
    write_cache(keys, values, key, value, slots)
    assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)

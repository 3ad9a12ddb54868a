"""The fast engine's CUDA paths, on a GPU only: the Triton decode kernel, and the engine with every step
captured as CUDA graphs giving the reference engine's tokens. CPU machines skip these; on a GPU host
``bash bench/lab/perf_gpu.sh`` runs them after its figures."""

from __future__ import annotations

import pytest
import torch

from serve.engine.config import EngineConfig
from serve.engine.fast.engine import FastEngine
from serve.engine.kernels.attention import decode_attention, decode_attention_reference
from serve.engine.model import load_model
from serve.engine.reference import HFEngine
from serve.engine.requests import SamplingParams
from tests.helpers import requests_for

pytestmark = pytest.mark.gpu

LENGTHS = [1, 31, 32, 33, 100, 160, 7]


def cache(dtype: torch.dtype, slots: int = 9) -> tuple[torch.Tensor, ...]:
    """Query, new key and value, cache and lengths; garbage from each row's new position on."""
    generator = torch.Generator(device="cuda").manual_seed(0)
    shape = (slots, 4, 160, 64)
    keys = torch.randn(shape, generator=generator, device="cuda").to(dtype)
    values = torch.randn(shape, generator=generator, device="cuda").to(dtype)
    query, key, value = (
        torch.randn((len(LENGTHS), 4, 64), generator=generator, device="cuda").to(dtype) for _ in range(3)
    )
    lengths = torch.tensor(LENGTHS, device="cuda")
    for row, length in enumerate(LENGTHS):  # what lies beyond a row's length must not reach its output
        keys[row, :, length - 1 :] = float("nan")
        values[row, :, length - 1 :] = float("nan")
    return query, key, value, keys, values, lengths


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.float16, 2e-3)])
def test_kernel_equals_reference(dtype, tolerance):
    query, key, value, keys, values, lengths = cache(dtype)
    expected_keys, expected_values = keys.clone(), values.clone()
    expected = decode_attention_reference(query, key, value, expected_keys, expected_values, lengths, 0.125)
    got = decode_attention(query, key, value, keys, values, lengths, 0.125)
    assert got.dtype == dtype and not got.isnan().any()
    torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)
    assert torch.equal(keys.nan_to_num(), expected_keys.nan_to_num())
    assert torch.equal(values.nan_to_num(), expected_values.nan_to_num())


def test_kernel_replays_in_a_graph_with_new_lengths():
    query, key, value, keys, values, lengths = cache(torch.float16)
    decode_attention(query, key, value, keys.clone(), values.clone(), lengths, 0.125)  # compile outside
    shorter = torch.tensor([1, 6, 7, 8, 9, 10, 7], device="cuda")  # within each row's written length
    expected = decode_attention_reference(query, key, value, keys.clone(), values.clone(), shorter, 0.125)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(query, key, value, keys, values, lengths, 0.125)
    lengths.copy_(shorter)
    graph.replay()
    torch.testing.assert_close(out, expected)


@pytest.fixture(scope="module")
def cuda_loaded(tiny_dir):
    """The tiny model in float32 on the GPU, with cuDNN's convolutions in full float32 too: they default to TF32
    (matrix products do not), which would round the reference's patch convolution and not the engine's matrix
    product, and an argmax of the tiny model's could turn on that rounding."""
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield load_model(str(tiny_dir), device="cuda", dtype="float32")
    finally:
        torch.backends.cudnn.allow_tf32 = tf32


@pytest.mark.parametrize(
    ("attention", "compiled", "overlap", "chunk"),
    [
        ("triton", "on", False, 256),
        ("triton", "off", False, 256),
        ("sdpa", "on", False, 256),
        ("triton", "on", True, 256),
        ("triton", "on", True, 4),  # six-request admissions in graphed chunks of 4 and 2, staged asynchronously
    ],
)
def test_graphed_engine_equals_reference(cuda_loaded, codec, attention, compiled, overlap, chunk):
    workload = requests_for(codec, [SamplingParams(max_new_tokens=4 + 5 * (i % 7)) for i in range(14)])
    reference = HFEngine(cuda_loaded, EngineConfig(kind="hf", max_batch_size=1))
    expected = [reference.generate([r])[0] for r in workload]
    config = EngineConfig(
        max_batch_size=6,
        max_seq_len=160,
        decode_attention=attention,
        compile=compiled,
        overlap=overlap,
        graph_admission_rows=chunk,
    )
    fast = FastEngine(cuda_loaded, config)
    fast.warm_up()
    assert fast.runner.steps.compiled == (compiled == "on")
    warm = {("admit", rows, width) for rows in fast.graphs.admission_rows for width in config.warm_admission_widths}
    assert warm <= fast.graphs.captured.keys()  # captured before any request
    assert fast.generate(workload) == expected
    assert fast.graphs.pad_admissions and {kind for kind, _, _ in fast.graphs.captured} == {"admit", "decode"}


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_graphed_engine_reports_the_references_logprobs(cuda_loaded, codec, overlap):
    """Log-probabilities read from the graphs' outputs, for the rows that ask, beside rows that do not."""
    params = [
        SamplingParams(max_new_tokens=4 + 5 * (i % 7), logprobs=(i % 3) * 2 if i % 2 else None) for i in range(10)
    ]
    workload = requests_for(codec, params)
    reference = HFEngine(cuda_loaded, EngineConfig(kind="hf", max_batch_size=1))
    expected = [reference.generate([r])[0] for r in workload]
    fast = FastEngine(cuda_loaded, EngineConfig(max_batch_size=4, max_seq_len=160, overlap=overlap))
    fast.warm_up()
    for got, want in zip(fast.generate(workload), expected):
        assert got.token_ids == want.token_ids
        if want.logprobs is None:
            assert got.logprobs is None
            continue
        torch.testing.assert_close(
            torch.tensor(got.logprobs.chosen), torch.tensor(want.logprobs.chosen), atol=1e-4, rtol=0
        )
        assert got.logprobs.top_ids == want.logprobs.top_ids

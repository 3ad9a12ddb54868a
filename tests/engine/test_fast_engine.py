"""The fast engine on the tiny model in float32 on the CPU: exactly the reference engine's tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from serve.engine.build import build_engine
from serve.engine.config import EngineConfig
from serve.engine.fast.engine import FastEngine
from serve.engine.fast.layers import LayerSteps
from serve.engine.model import ModelGeometry
from serve.engine.reference import encode_pixels, normalize_pixels
from serve.engine.requests import Collector, GenerationRequest, SamplingParams
from serve.errors import InvalidRequest
from serve.kosmos2.images import prepare_image
from serve.kosmos2.tasks import Task, build_prompt
from tests.helpers import LIMITS, Recorder, encode, photo, requests_for, run_interpreted


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "overlap"])
def fast(loaded, request):
    """The engine with each decode step's tokens taken before the next is launched (``sync``), and as it runs by
    default, each decode step launched before the last one's tokens are taken (``overlap``): the same tokens."""
    return FastEngine(loaded, EngineConfig(kind="fast", max_batch_size=6, max_seq_len=160, overlap=request.param))


@pytest.fixture(scope="module")
def workload(codec):
    """Fourteen requests of mixed prompt lengths and token limits: more than the six slots."""
    return requests_for(codec, [SamplingParams(max_new_tokens=4 + 5 * (i % 7)) for i in range(14)])


@pytest.fixture(scope="module")
def reference(hf_engine, workload):
    return [hf_engine.generate([r])[0] for r in workload]


def test_workload_exercises_the_engine(workload, reference):
    assert len({len(r.prompt_ids) for r in workload}) >= 4
    assert {r.finish_reason for r in reference} == {"stop", "length"}
    assert len({len(r.token_ids) for r in reference if r.finish_reason == "stop"}) >= 3  # EOS at several steps


def test_all_at_once_equals_reference(fast, workload, reference):
    assert fast.generate(workload) == reference
    assert not fast.scheduler.running and sorted(fast.scheduler.free) == list(range(6))


def test_requests_joining_mid_flight(fast, workload, reference):
    sinks = [Recorder() for _ in workload]
    for request, sink in zip(workload[:3], sinks[:3]):
        fast.submit(request, sink)
    fast.step()
    fast.step()
    for index in range(3, len(workload)):
        fast.submit(workload[index], sinks[index])
        fast.step()
    while fast.has_work:
        fast.step()
    assert [s.result for s in sinks] == reference
    assert [s.seen for s in sinks] == [r.token_ids for r in reference]


@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlap"])
def test_slots_left_free_after_an_end_token(loaded, hf_engine, codec, overlap):
    """More slots than requests, so a slot freed by its end token stays free: the overlapped step launched
    before that token was taken must not hand the slot a token (it ended the engine's step with a KeyError)."""
    questions = ["why?", "what colour is the large circle at the top left of the picture?", "is it big?"]
    requests = []
    for i in range(12):
        pixels = prepare_image(encode(photo(200 + 10 * i, 160, seed=30 + i), "PNG"), LIMITS).pixels
        prompt = build_prompt(Task.VQA, questions[i % 3]).text
        requests.append(GenerationRequest(pixels, codec.encode(prompt), SamplingParams(max_new_tokens=8 + 2 * i)))
    expected = [hf_engine.generate([r])[0] for r in requests]
    assert len({len(r.token_ids) for r in expected if r.finish_reason == "stop"}) >= 2  # ends at several steps
    engine = FastEngine(loaded, EngineConfig(kind="fast", max_batch_size=16, max_seq_len=256, overlap=overlap))
    assert engine.generate(requests) == expected
    assert not engine.scheduler.running and sorted(engine.scheduler.free) == list(range(16))


def test_sampling_and_bans_match_reference_and_repeat(fast, hf_engine, codec):
    params = [
        SamplingParams(max_new_tokens=20, temperature=0.9, seed=11),
        SamplingParams(max_new_tokens=20, temperature=1.3, top_p=0.8, seed=12),
        SamplingParams(max_new_tokens=20, no_repeat_ngram_size=3),
        SamplingParams(max_new_tokens=20),
        SamplingParams(max_new_tokens=20, temperature=1.0, seed=11, no_repeat_ngram_size=2),
    ]
    requests = requests_for(codec, params)
    expected = [hf_engine.generate([r])[0] for r in requests]
    assert fast.generate(requests) == expected
    assert fast.generate(requests[::-1]) == expected[::-1]


def test_cancel_frees_the_slot_and_spares_the_others(fast, workload, reference):
    """One call cancels a running request and a waiting one (eight requests, six slots), after a step that ends
    none of them (their answers are longer than the step's two tokens)."""
    lasting = [i for i, result in enumerate(reference) if result.completion_tokens > 2]
    picks = [lasting[j % len(lasting)] for j in range(8)]
    requests = [workload[i] for i in picks]
    sinks = [Recorder() for _ in requests]
    ids = [fast.submit(r, s) for r, s in zip(requests, sinks)]
    fast.step()
    assert fast.running_count == 6 and [p.id for p in fast.waiting] == ids[6:]
    fast.cancel(ids[1], ids[7])
    assert [p.id for p in fast.waiting] == [ids[6]] and fast.running_count == 5
    while fast.has_work:
        fast.step()
    assert sinks[1].result is None and sinks[7].result is None
    kept = (0, 2, 3, 4, 5, 6)
    assert [sinks[i].result for i in kept] == [reference[picks[i]] for i in kept]
    assert sorted(fast.scheduler.free) == list(range(6))


def test_too_long_is_refused(fast, workload):
    request = workload[0]
    too_long = GenerationRequest(request.pixels, request.prompt_ids, SamplingParams(max_new_tokens=150))
    with pytest.raises(InvalidRequest) as info:
        fast.submit(too_long, Recorder())
    assert info.value.param == "max_tokens"


def test_build_engine_picks_the_kind(loaded):
    assert isinstance(build_engine(loaded, EngineConfig(max_batch_size=2)), FastEngine)
    with pytest.raises(ValueError):
        FastEngine(loaded, EngineConfig(max_seq_len=2048))  # the tiny model has 512 positions
    assert np.array_equal(FastEngine(loaded, EngineConfig(max_batch_size=2)).scheduler.free, [0, 1])


def test_ignore_eos_forces_the_length(fast, hf_engine, workload, reference):
    """Benchmarks force exactly N tokens: the end token is then an ordinary one, in both engines."""
    stopped = [i for i, r in enumerate(reference) if r.finish_reason == "stop"][:3]
    forced = [
        GenerationRequest(workload[i].pixels, workload[i].prompt_ids, SamplingParams(30, ignore_eos=True))
        for i in stopped
    ]
    results = fast.generate(forced)
    assert results == [hf_engine.generate([r])[0] for r in forced]
    for index, result in zip(stopped, results):
        assert result.finish_reason == "length" and len(result.token_ids) == 30
        assert result.token_ids[: len(reference[index].token_ids) + 1] == reference[index].token_ids + [2]


@pytest.mark.parametrize("slots", [6, 16])
def test_padded_admissions_equal_reference(loaded, workload, reference, slots):
    """On CUDA admissions are padded to captured shapes (rows to the next of ``admission_buckets`` up to the slot
    count, prompts to a multiple of 8, padding rows into the scratch slot); here the same padding runs eagerly
    and changes no token: 3 requests padded to 4 rows, 9 to 6 (six slots) or 12, 14 to 16."""
    engine = FastEngine(loaded, EngineConfig(kind="fast", max_batch_size=slots, max_seq_len=160))
    engine.graphs.pad_admissions = True
    assert engine.generate(workload[:3]) == reference[:3]
    assert engine.generate(workload[:9]) == reference[:9]
    assert engine.generate(workload) == reference


@pytest.mark.parametrize("padded", [False, True], ids=["eager", "padded"])
def test_chunked_admissions_equal_reference(loaded, workload, reference, padded):
    """An admission of more than ``graph_admission_rows`` requests runs in chunks of that many, each staged at
    its own offset (on CUDA each a captured graph; ``padded``: padded to one, eagerly): the same tokens."""
    config = EngineConfig(kind="fast", max_batch_size=6, max_seq_len=160, graph_admission_rows=4)
    engine = FastEngine(loaded, config)
    engine.graphs.pad_admissions = padded
    chunks = []
    stage = engine._stage

    def spy(batch, offset):
        chunks.append((len(batch), offset))
        return stage(batch, offset)

    engine._stage = spy
    assert engine.generate(workload) == reference
    assert chunks[:2] == [(4, 0), (2, 4)]  # the first admission: six requests into six slots
    assert max(size for size, _ in chunks) == 4 and engine.admissions < len(chunks)


def test_first_chunk_is_staged_while_the_step_in_flight_runs(loaded, workload, reference):
    """With a decode step in flight, an admission stacks its first chunk's pixels and prompts before it waits for
    that step's tokens (the host's part overlaps the device's), and the tokens stay the reference's."""
    engine = FastEngine(loaded, EngineConfig(kind="fast", max_batch_size=6, max_seq_len=160, admit_ratio=0))
    calls = []
    for name in ("_stage", "_settle"):
        method = getattr(engine, name)
        setattr(engine, name, lambda *args, method=method, name=name: calls.append(name) or method(*args))
    sinks = [Collector() for _ in workload[:4]]
    engine.submit(workload[0], sinks[0])
    engine.step()  # admitted, and its first decode step launched
    assert engine.in_flight is not None
    calls.clear()
    for request, sink in zip(workload[1:4], sinks[1:]):
        engine.submit(request, sink)
    engine.step()
    assert calls[:2] == ["_stage", "_settle"] and engine.running_count == 4
    while engine.has_work:
        engine.step()
    assert [sink.result for sink in sinks] == reference[:4]


def test_a_failed_admission_fails_its_requests_and_the_engine_serves_on(loaded, workload, reference):
    """An admission that fails on the device (out of memory, say) fails its own requests with that error and
    returns their slots; the requests after it are served."""
    engine = FastEngine(loaded, EngineConfig(kind="fast", max_batch_size=6, max_seq_len=160))
    forward = engine.runner.admission_forward
    failures = iter([RuntimeError("CUDA out of memory (simulated)")])

    def failing_once(rows, width):
        error = next(failures, None)
        if error is not None:
            raise error
        return forward(rows, width)

    engine.runner.admission_forward = failing_once
    sinks = [Collector() for _ in workload[:3]]
    for request, sink in zip(workload[:3], sinks):
        engine.submit(request, sink)
    engine.step()
    assert all("out of memory" in str(sink.error) for sink in sinks) and sorted(engine.scheduler.free) == list(range(6))
    assert engine.generate(workload[3:9]) == reference[3:9]


def test_trickling_requests_are_gathered(loaded, workload, reference):
    """While sequences run, a lone newcomer waits until waiting requests are ``admit_ratio`` of the running
    ones, fill the free slots, or have waited ``admit_max_steps`` decode steps; nothing running: at once."""
    config = EngineConfig(kind="fast", max_batch_size=8, max_seq_len=160, admit_ratio=0.5, admit_max_steps=3)
    engine = FastEngine(loaded, config)
    long = [i for i, r in enumerate(reference) if len(r.token_ids) >= 12]
    sinks = {i: Recorder() for i in range(len(workload))}
    engine.submit(workload[long[0]], sinks[long[0]])
    engine.step()
    assert engine.running_count == 1  # nothing was running: admitted at once
    for i in long[1:4]:
        engine.submit(workload[i], sinks[i])
    engine.step()
    assert engine.running_count == 4  # 3 waiting >= 0.5 x 1 running
    newcomer = next(i for i in range(len(workload)) if i not in long[:4])
    engine.submit(workload[newcomer], sinks[newcomer])
    held = 0
    while engine.waiting:
        engine.step()
        held += 1
    assert held == 4  # 1 < 0.5 x 4: held for 3 steps, admitted on the 4th
    while engine.has_work:
        engine.step()
    for i in [*long[:4], newcomer]:
        assert sinks[i].result == reference[i]


def test_vision_path_equals_the_models_own(loaded, workload):
    """The engine's vision path (embeddings as one matrix product, each projection adding its residual, the quick
    GELU in place by its reference on the CPU) gives the model's own image embeddings, to float32's rounding: the
    same operations, summed in another order."""
    geometry = ModelGeometry(loaded)
    pixels = torch.from_numpy(np.stack([r.pixels for r in workload[:3]]))
    engine = FastEngine(loaded, EngineConfig(kind="fast", max_batch_size=2, max_seq_len=160))
    tower = loaded.model.vision_model.model
    values = normalize_pixels(pixels, geometry, loaded.dtype)
    with torch.inference_mode():
        torch.testing.assert_close(
            LayerSteps().vision_embeddings(engine.runner.patches, tower.pre_layrnorm, pixels),
            tower.pre_layrnorm(tower.embeddings(values)),
            atol=1e-5,
            rtol=1e-5,
        )
        expected = encode_pixels(loaded, geometry, pixels)
        got = engine.runner.encode(pixels)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_compiled_layers_equal_reference(loaded, workload, reference):
    """Compiled layers (CUDA's default, forced here on the CPU) change no token, and ``warm_up`` compiles every
    shape the engine runs: none is compiled while requests wait."""
    engine = FastEngine(loaded, EngineConfig(kind="fast", max_batch_size=6, max_seq_len=160, compile="on"))
    engine.warm_up()
    assert engine.runner.steps.compiled
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert engine.generate(workload) == reference


def test_a_failed_compile_leaves_the_layers_uncompiled(loaded, workload, reference, monkeypatch, caplog):
    def broken(layer, hidden):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(
        "serve.engine.fast.runner.compiled_steps", lambda: LayerSteps(vision_attention=broken, compiled=True)
    )
    engine = FastEngine(loaded, EngineConfig(kind="fast", max_batch_size=6, max_seq_len=160, compile="on"))
    engine.warm_up()
    assert not engine.runner.steps.compiled and "no compiler here" in caplog.text and "run uncompiled" in caplog.text
    assert engine.generate(workload[:4]) == reference[:4]


def test_overlap_runs_no_step_past_a_length_limit(loaded, workload):
    """Sequences that end by length are known to end before their last tokens are taken: overlapped, the
    engine launches the same nine-token batch's eight decode steps as it does in sync, and nothing is left."""
    forced = [GenerationRequest(r.pixels, r.prompt_ids, SamplingParams(9, ignore_eos=True)) for r in workload[:4]]
    runs = {}
    for overlap in (False, True):
        engine = FastEngine(loaded, EngineConfig(kind="fast", max_batch_size=6, max_seq_len=160, overlap=overlap))
        runs[overlap] = engine.generate(forced), engine.transfer.steps_sent, engine.in_flight
    assert runs[True] == runs[False] and runs[False][1:] == (8, None)


# The workload through an engine whose kernels run in Triton's interpreter (set before Triton decorates them,
# hence a fresh process); saves each result's tokens and finish reason.
TRITON_SCRIPT = """
import sys, torch
from serve.engine.config import EngineConfig
from serve.engine.fast.engine import FastEngine
from serve.engine.model import load_model
from serve.engine.requests import SamplingParams
from serve.kosmos2.text import TextCodec
from tests.helpers import requests_for
loaded = load_model(sys.argv[2], device="cpu")
limits = [SamplingParams(max_new_tokens=4 + 5 * (i % 7)) for i in range(14)]
workload = requests_for(TextCodec(loaded.processor), limits)
engine = FastEngine(loaded, EngineConfig(max_batch_size=6, max_seq_len=160, decode_attention="triton"))
assert engine.runner.attention == "triton"
torch.save([[r.token_ids, r.finish_reason] for r in engine.generate(workload)], sys.argv[1])
"""


def test_triton_decode_equals_reference(tiny_dir, reference, tmp_path):
    """The CUDA engine's kernels (decode attention, which also writes the new keys and values into the cache,
    the cache writes and the feed-forward middles) give the reference's tokens, run by Triton's interpreter."""
    results = run_interpreted(TRITON_SCRIPT, tmp_path / "results.pt", str(tiny_dir))
    assert results == [[r.token_ids, r.finish_reason] for r in reference]

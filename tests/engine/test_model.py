"""The tiny model is reproducible and real; loading fails with one clear sentence when it must."""

from __future__ import annotations

import copy
import hashlib

import pytest

from serve.engine.model import ModelUnavailable, load_model, make_projection_bidirectional, resolve_dtype
from serve.kosmos2.tiny import write_tiny


def digests(directory) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


def test_tiny_is_byte_identical_and_small(tmp_path, tiny_dir):
    again = write_tiny(tmp_path / "again")
    assert digests(again) == digests(tiny_dir)
    assert sum(p.stat().st_size for p in again.iterdir()) < 2_000_000


def test_tiny_runs_the_real_code_paths(loaded):
    processor, config = loaded.processor, loaded.model.config
    assert type(processor).__name__ == "Kosmos2Processor"
    assert config.latent_query_num == 64
    assert len(processor.tokenizer) == config.text_config.vocab_size
    vocab = processor.tokenizer.get_vocab()
    assert "<phrase>" in vocab and "<patch_index_1023>" in vocab and "</delimiter_of_multi_objects/>" in vocab


def test_unreachable_model_names_itself_and_the_way_out(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelUnavailable) as info:
        load_model("microsoft/kosmos-2-does-not-exist", device="cpu")
    message = str(info.value)
    assert "microsoft/kosmos-2-does-not-exist" in message and "python -m serve tiny" in message


def test_real_size_config_loads_with_dummy_weights_lazily(tmp_path):
    from transformers import AutoConfig, Kosmos2Processor

    directory = write_tiny(tmp_path / "real", real_size=True)
    config = AutoConfig.from_pretrained(directory)
    assert (config.text_config.layers, config.text_config.embed_dim, config.text_config.vocab_size) == (24, 2048, 65037)
    assert len(Kosmos2Processor.from_pretrained(directory).tokenizer) == 65037


def test_dtype_choices():
    import torch

    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    with pytest.raises(ValueError):
        resolve_dtype("float8", torch.device("cpu"))


def test_every_latent_query_sees_every_image_feature(loaded):
    """The image-to-text projection is bidirectional once loaded, and the fix makes it so where transformers (5.x
    before 5.23) builds it causal: then under SDPA latent query ``i`` saw only the first ``i + 1`` features. The
    reference is the module under eager attention, which applies no causal mask whatever the flag."""
    import torch

    assert loaded.model.image_to_text_projection.x_attn.is_causal is False
    projection = copy.deepcopy(loaded.model.image_to_text_projection)
    eager = copy.deepcopy(projection)
    eager.x_attn.config._attn_implementation = "eager"
    assert projection.x_attn.config._attn_implementation == "sdpa"
    width = loaded.model.config.vision_config.hidden_size
    features = torch.randn(2, 257, width, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        expected = eager(features)[0]
        projection.x_attn.is_causal = True  # as transformers 5.17 to 5.22 build it
        assert (projection(features)[0] - expected).abs().max() > 0.1
        make_projection_bidirectional(projection)
        torch.testing.assert_close(projection(features)[0], expected, atol=1e-5, rtol=1e-5)

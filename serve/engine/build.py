"""The engine that a config names, around the checkpoint loaded as that engine needs it."""

from __future__ import annotations

from serve.engine.base import Engine
from serve.engine.config import EngineConfig, ModelConfig
from serve.engine.model import LoadedModel, load_model


def build_engine(loaded: LoadedModel, config: EngineConfig) -> Engine:
    """The engine ``config.kind`` names, around a loaded model."""
    if config.kind == "hf":
        from serve.engine.reference import HFEngine

        return HFEngine(loaded, config)
    if config.kind == "pixels":
        from serve.engine.pixels import PixelEngine

        return PixelEngine(loaded, config)
    from serve.engine.fast.engine import FastEngine

    return FastEngine(loaded, config)


def load_for_engine(model: ModelConfig, engine: EngineConfig) -> LoadedModel:
    """The checkpoint of ``model`` as ``engine.kind`` needs it: the pixel engine reads only the config and the
    processor (its model has no weights, and it runs on the CPU whatever ``model.device`` says)."""
    if engine.kind == "pixels":
        return load_model(model.source, device="cpu", dtype="float32", load_format="meta")
    return load_model(model.source, device=model.device, dtype=model.dtype, load_format=model.load_format)

"""The engine that a config names, around a loaded model."""

from __future__ import annotations

from serve.engine.base import Engine
from serve.engine.config import EngineConfig
from serve.engine.model import LoadedModel


def build_engine(loaded: LoadedModel, config: EngineConfig) -> Engine:
    """The engine ``config.kind`` names, around a loaded model."""
    if config.kind == "hf":
        from serve.engine.reference import HFEngine

        return HFEngine(loaded, config)
    from serve.engine.fast.engine import FastEngine

    return FastEngine(loaded, config)

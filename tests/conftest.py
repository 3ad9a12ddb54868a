"""Shared fixtures: the tiny Kosmos-2 built once per test run, its codec and reference engine, and the live
service. Tiers by marker: ``slow`` (starts Ray or runs long), ``gpu`` (needs CUDA; skipped without it),
``multinode`` (owns a local multi-node Ray cluster: its own pytest process), ``real_model`` (opt in with
``--real-model PATH``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--real-model", default=None, help="path or id of the real Kosmos-2 checkpoint")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``gpu`` tests where no CUDA device is visible, and the ``real_model`` ones without --real-model."""
    import torch

    real_model = config.getoption("--real-model")
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_model = pytest.mark.skip(reason="needs the real checkpoint: pass --real-model PATH")
    for item in items:
        if item.get_closest_marker("gpu") and not torch.cuda.is_available():  # the marker, not a test id "gpu"
            item.add_marker(no_gpu)
        if item.get_closest_marker("real_model") and not real_model:
            item.add_marker(no_model)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    from serve.kosmos2.tiny import write_tiny

    return write_tiny(tmp_path_factory.mktemp("tiny") / "kosmos2")


@pytest.fixture(scope="session")
def loaded(tiny_dir):
    from serve.engine.model import load_model

    return load_model(str(tiny_dir), device="cpu")


@pytest.fixture(scope="session")
def codec(loaded):
    from serve.kosmos2.text import TextCodec

    return TextCodec(loaded.processor)


@pytest.fixture(scope="session")
def hf_engine(loaded):
    from serve.engine.config import EngineConfig
    from serve.engine.reference import HFEngine

    return HFEngine(loaded, EngineConfig(kind="hf", max_batch_size=8))


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def service(tiny_dir):
    """The real Serve application on 127.0.0.1 with the tiny model (configs/local.yaml); yields its config.

    ``service.http.port`` is a free port; the URL is ``f"http://127.0.0.1:{service.http.port}"``."""
    from serve.app import launch
    from serve.app.config import load_config

    config = load_config(ROOT / "configs/local.yaml", model__source=str(tiny_dir), http__port=free_port())
    launch.start(config, num_cpus=2)
    yield config
    launch.stop()


@pytest.fixture(scope="session")
def service_url(service) -> str:
    return f"http://{service.http.host}:{service.http.port}"


@pytest.fixture(scope="session")
def deploy_app(service, tiny_dir):
    """Deploy another application beside the main one, under ``/<name>``, with config overrides; returns its
    URL. Used for auth, overload and remote-image settings. Deleted at the end of the session."""
    from ray import serve

    from serve.app.builder import build_app
    from serve.app.config import ServiceConfig

    names = []

    def deploy(name: str, overrides: dict) -> str:
        data = service.model_dump()
        for section, values in overrides.items():
            data[section] = {**data[section], **values} if isinstance(values, dict) else values
        serve.run(build_app(ServiceConfig.model_validate(data)), name=name, route_prefix=f"/{name}")
        names.append(name)
        return f"http://{service.http.host}:{service.http.port}/{name}"

    yield deploy
    for name in names:
        serve.delete(name)

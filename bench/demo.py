"""``make bench``: the tiny offline model served in this process, a short load run against it, then a clean stop.

    python -m bench demo --out out/bench [--port 0] [--model .cache/tiny-kosmos2] [--concurrency 1,4] [--duration 5]

:func:`tiny_service` builds the tiny model if its folder has none, starts Ray, Serve and the application on
127.0.0.1 with ``configs/local.yaml`` (``serve.app.launch``), yields the service's URL, and stops everything when
the block ends, also on an error or Ctrl-C. ``python -m bench demo`` runs ``python -m bench run`` inside it
(``bench.commands``), so the output folder holds the usual files of a load run. The numbers measure the tiny
model on this machine's CPU: they show the bench working, not Kosmos-2's speed.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from serve.app.shipped import config_path

TINY = Path(".cache/tiny-kosmos2")
"""The tiny model's folder, the one ``make tiny`` and ``python -m serve demo`` use."""

LOCAL_CONFIG = config_path("local.yaml")
"""The service's config for one machine without a GPU."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def tiny_service(model: Path = TINY, port: int = 0) -> Iterator[str]:
    """The tiny model served on 127.0.0.1:``port`` (0: a free port) for the duration of the block; yields the
    base URL. The model is written to ``model`` first if that folder holds none."""
    import ray

    from serve.app import launch
    from serve.app.config import load_config
    from serve.kosmos2.tiny import write_tiny

    if not (Path(model) / "model.safetensors").exists():
        write_tiny(model)
    config = load_config(LOCAL_CONFIG, model__source=str(model), http__port=port or free_port())
    try:
        yield launch.start(config)
    finally:
        if ray.is_initialized():  # else Serve's shutdown would look for a cluster to connect to
            launch.stop()

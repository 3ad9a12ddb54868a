"""Starting the service on this machine: Ray, Serve's HTTP proxy, and the application.

Used by ``python -m serve run``, the demo, bench and the tests, so that all start it the same way. It starts
a Ray instance of its own (never joining one it happens to find on the machine); with ``RAY_ADDRESS`` set it
joins that cluster instead.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import ray
from ray import serve

from serve.app import APP_NAME, build_app
from serve.config import ServiceConfig


def start(
    config: ServiceConfig, *, dashboard: bool = False, num_cpus: int | None = None, show_logs: bool = False
) -> str:
    """Start (or join) Ray, Serve on ``config.http``, and the app; return its base URL once ready."""
    if not ray.is_initialized():
        options: dict = {"include_dashboard": dashboard, "log_to_driver": show_logs}
        if "RAY_ADDRESS" not in os.environ:  # a cluster of our own, even where another one runs on this machine
            options.update(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1")
        ray.init(**options)
    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    return f"http://{config.http.host}:{config.http.port}"


def stop() -> None:
    """Shut Serve and Ray down (what ``start`` started)."""
    serve.shutdown()
    ray.shutdown()


def run_until_signalled(config: ServiceConfig, *, dashboard: bool = False) -> None:
    """Serve in the foreground until SIGINT or SIGTERM, then stop cleanly."""
    stopping = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stopping.set())
    started = time.monotonic()
    url = start(config, dashboard=dashboard, show_logs=True)
    print(
        f"Kosmos-2 ({config.served_model_name}) is ready at {url}/v1 after {time.monotonic() - started:.0f} s; "
        "Ctrl-C or SIGTERM stops it.",
        flush=True,
    )
    stopping.wait()
    print("stopping...", flush=True)
    stop()

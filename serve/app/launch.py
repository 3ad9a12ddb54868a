"""Starting the service on this machine: Ray, Serve's HTTP entry, and the application.

Used by ``python -m serve run``, the demo, bench and the tests, so that all start it the same way. It starts
a Ray instance of its own (never joining one it happens to find on the machine); with ``RAY_ADDRESS`` set it
joins that cluster instead.

With ``http.proxy: haproxy`` (the default) the Ray it starts runs Serve's throughput-optimized mode with
HAProxy as the HTTP entry: HAProxy forwards each request straight to an Ingress replica's own HTTP server,
instead of through Serve's Python proxy, and deployments call each other over gRPC. On this project's
benchmark that served 1.77 times the requests per second on the same CPUs (``results/proxy-cpu``). Serve
reads these switches from the environment of its processes, so they are set here before Ray starts; a
cluster that Ray's launcher starts sets them in its start commands (``cluster.yaml``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

from serve.app.config import ServiceConfig

HAPROXY_PREFIX = "kosmos2-haproxy-"


def start(
    config: ServiceConfig, *, dashboard: bool = False, num_cpus: int | None = None, show_logs: bool = False
) -> str:
    """Start (or join) Ray, Serve on ``config.http``, and the app; return its base URL once ready.

    Ray is imported here, after the environment is set: Serve also reads it where handles are made.
    """
    import ray

    if not ray.is_initialized():
        options: dict = {"include_dashboard": dashboard, "log_to_driver": show_logs}
        if "RAY_ADDRESS" not in os.environ:  # a cluster of our own, even where another one runs on this machine
            options.update(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", dashboard_host="127.0.0.1")
            os.environ.update(serve_environment(config))
        ray.init(**options)
    from ray import serve

    from serve.app.builder import APP_NAME, build_app

    serve.start(http_options={"host": config.http.host, "port": config.http.port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    return f"http://{config.http.host}:{config.http.port}"


def serve_environment(config: ServiceConfig) -> dict[str, str]:
    """Serve's switches for ``config.http.proxy``, for the processes of a Ray about to start on this machine.

    HAProxy's files, metrics and stats ports are this instance's own, so that several can run on one machine.
    """
    if config.http.proxy == "serve":
        return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0", "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    state = tempfile.mkdtemp(prefix=HAPROXY_PREFIX)
    metrics_port, stats_port = _free_port(), _free_port()
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",  # that mode buffers 1000 log lines: write each at once
        # An Ingress replica leaving drains for 30 s by default, for remote load balancers to notice; this
        # machine's HAProxy hears of it from the controller within a second.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{state}/haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{state}/admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": state,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{state}/server-state",
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics_port),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(stats_port),
    }


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def stop() -> None:
    """Shut Serve and Ray down (what ``start`` started)."""
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    state = os.environ.get("RAY_SERVE_HAPROXY_SERVER_STATE_BASE", "")
    if Path(state).name.startswith(HAPROXY_PREFIX):  # the files serve_environment made for this instance
        shutil.rmtree(state, ignore_errors=True)


def run_until_signalled(config: ServiceConfig, *, dashboard: bool = False) -> None:
    """Serve in the foreground until SIGINT or SIGTERM, then stop cleanly."""
    stopping = threading.Event()
    started = time.monotonic()
    url = start(config, dashboard=dashboard, show_logs=True)
    for sig in (signal.SIGINT, signal.SIGTERM):  # after Ray's start, which installs handlers of its own
        signal.signal(sig, lambda *_: stopping.set())
    print(
        f"Kosmos-2 ({config.served_model_name}) is ready at {url}/v1 after {time.monotonic() - started:.0f} s; "
        "Ctrl-C or SIGTERM stops it.",
        flush=True,
    )
    stopping.wait()
    print("stopping...", flush=True)
    stop()

"""Starting the service on this machine (Ray, Serve's HTTP entry, the application) and stopping it so that
nothing of it is left.

Used by ``python -m serve run``, the demo, bench and the tests, so that all start it the same way. It starts
a Ray instance of its own (never joining one it happens to find on the machine); with ``RAY_ADDRESS`` set it
joins that cluster instead and deploys the application there.

With ``http.proxy: haproxy`` (the default) the Ray it starts runs Serve's throughput-optimized mode with
HAProxy as the HTTP entry: HAProxy forwards each request straight to an Ingress replica's own HTTP server,
instead of through Serve's Python proxy, and deployments call each other over gRPC. On this project's
benchmark that served 1.77 times the requests per second on the same CPUs (``results/proxy-cpu``). Serve
reads these switches from the environment of its processes, so they are set here before Ray starts; a
cluster that Ray's launcher starts sets them in its start commands (``cluster.yaml``).

An instance of its own (``docs/reliability.md``, "Start and stop"):

- owns a state folder (``serve.app.instance``): locked while it lives, cleaned at the next start if it was killed;
- listens only on ``http.host``: on a loopback host, Ray itself runs as a one-machine instance on 127.0.0.1,
  HAProxy's stats and metrics pages get free ports of their own on that host, and the listeners Serve offers no
  switch for are bound by ``serve.app.worker_setup``;
- fits the replicas' CPU requests to the machine (``serve.app.fitting``) or says at once what does not fit;
- is ready when ``/health`` answers 200, and stops in order: drain, HAProxy, Serve, Ray, then whatever is left.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from serve.app.config import ServiceConfig
from serve.app.fitting import DoesNotFit, fit
from serve.app.instance import (
    INSTANCE_DIR_ENV,
    Instance,
    InstanceBusy,
    can_listen,
    end_processes,
    free_port,
    is_loopback,
)

DRAIN_TIMEOUT_S = 30.0
"""How long a stop waits for the requests in flight (``python -m serve run --drain-timeout``)."""
HAPROXY_STOP_S = 5.0
"""How long HAProxy has to finish its last answers and close its connections after its soft stop."""
WORKER_SETUP = "serve.app.worker_setup.setup"
POLL_S = 0.5

_instance: Instance | None = None
_saved_environment: dict[str, str | None] = {}


class StartFailed(RuntimeError):
    """The service cannot start as configured; the message says why and what to change."""


class StopRequested(Exception):
    """A stop was asked for while the service was starting."""


def _check(stopping: threading.Event) -> None:
    if stopping.is_set():
        raise StopRequested


def start(
    config: ServiceConfig,
    *,
    dashboard: bool = False,
    num_cpus: int | None = None,
    show_logs: bool = False,
    stopping: threading.Event | None = None,
) -> str:
    """Start (or join) Ray, Serve on ``config.http``, and the app; return its base URL once ``/health`` answers
    200. Raises ``StartFailed`` or ``InstanceBusy``, or ``StopRequested`` once ``stopping`` is set (checked
    between steps and while waiting), having stopped whatever it had started.

    Serve reads its switches from the environment of the processes Ray starts, so they are set before Ray
    starts, and taken back by ``stop``.
    """
    global _instance
    import ray

    stopping = stopping or threading.Event()

    if config.http.port == 0:
        config = config.model_copy(
            update={"http": config.http.model_copy(update={"port": free_port(config.http.host)})}
        )
    own = not ray.is_initialized() and "RAY_ADDRESS" not in os.environ
    try:
        if own:
            _instance, ended = Instance.claim(config.http.host, config.http.port)
            if ended:
                print(f"note: ended {ended} processes left by an instance on this port that was killed", flush=True)
            if not can_listen(config.http.host, config.http.port):
                raise StartFailed(f"{config.http.host}:{config.http.port} is in use by another program")
            _set_environment(serve_environment(config, _instance.folder))
            config = _start_ray(config, _instance, dashboard=dashboard, num_cpus=num_cpus, show_logs=show_logs)
        elif not ray.is_initialized():
            ray.init(include_dashboard=dashboard, log_to_driver=show_logs)
        from ray import serve

        from serve.app.builder import APP_NAME, build_app

        _check(stopping)
        serve.start(http_options={"host": config.http.host, "port": config.http.port})
        _check(stopping)
        target = serve.RunTarget(build_app(config), name=APP_NAME, route_prefix="/")
        serve.run_many([target], wait_for_applications_running=False)
        url = f"http://{_address(config.http.host)}:{config.http.port}"
        _wait_until_ready(url, APP_NAME, own=own, stopping=stopping)
        return url
    except BaseException:
        stop()
        raise


def _start_ray(
    config: ServiceConfig, instance: Instance, *, dashboard: bool, num_cpus: int | None, show_logs: bool
) -> ServiceConfig:
    """Start this instance's Ray and return ``config`` fitted to it.

    The process keeps its own SIGTERM handler: ``ray.init`` would install one that raises ``SystemExit``
    wherever the main thread is, and its core's crash handler reports a SIGTERM before passing it on (it is
    replaced once Ray has started)."""
    import ray
    from ray._private import ray_constants
    from ray._private import utils as ray_utils

    before = {child.pid for child in psutil.Process().children()}
    enabled, set_handler = ray_constants.ENABLE_RAY_CLUSTER, ray_utils.set_sigterm_handler
    # Read by Ray when it picks this node's address; its processes get that address from Ray, and the variable
    # set in serve_environment for any that look it up themselves.
    ray_constants.ENABLE_RAY_CLUSTER = not is_loopback(config.http.host)
    ray_utils.set_sigterm_handler = lambda handler: None
    try:
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            log_to_driver=show_logs,
            runtime_env={"worker_process_setup_hook": WORKER_SETUP},
        )
    finally:  # what Ray started is the instance's, even if it failed to start
        ray_constants.ENABLE_RAY_CLUSTER, ray_utils.set_sigterm_handler = enabled, set_handler
        instance.adopt(child for child in psutil.Process().children() if child.pid not in before)
    on_term = signal.getsignal(signal.SIGTERM)
    if on_term is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    try:
        fitted = fit(config, ray.cluster_resources())
    except DoesNotFit as exc:
        raise StartFailed(str(exc)) from None
    if fitted.note:
        print(f"note: {fitted.note}", flush=True)
    return fitted.config


def serve_environment(config: ServiceConfig, folder: Path) -> dict[str, str | None]:
    """The environment of this machine's Ray for ``config``: Serve's switches for ``config.http.proxy``,
    HAProxy's files in the instance's ``folder`` and free ports of its own on ``http.host``, and Ray as a
    one-machine instance on loopback where the host is. None: the variable is removed."""
    host = config.http.host
    haproxy = config.http.proxy == "haproxy"
    environment: dict[str, str | None] = {
        INSTANCE_DIR_ENV: str(folder),
        # Ray's switch for a one-machine instance (made for laptops): its node address becomes 127.0.0.1, where
        # its processes then listen.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0" if is_loopback(host) else None,
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1" if haproxy else "0",
        "RAY_SERVE_ENABLE_HA_PROXY": "1" if haproxy else "0",
    }
    files = {
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg",
        "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock",
    }
    ports = (
        "RAY_SERVE_HAPROXY_STATS_PORT",
        "RAY_SERVE_HAPROXY_METRICS_PORT",
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT",
        "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT",
    )
    tuning = {
        "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",  # that mode buffers 1000 log lines: write each at once
        # An Ingress replica leaving drains for 30 s by default, for remote load balancers to notice; this
        # machine's HAProxy hears of it from the controller within a second.
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2",
    }
    environment["RAY_SERVE_HAPROXY_SERVER_STATE_BASE"] = str(folder) if haproxy else None
    environment.update({key: str(folder / name) if haproxy else None for key, name in files.items()})
    environment.update({key: str(free_port(host)) if haproxy else None for key in ports})
    environment.update({key: value if haproxy else None for key, value in tuning.items()})
    return environment


def stop(drain_timeout_s: float = 0.0) -> None:
    """Stop what ``start`` started: drain for up to ``drain_timeout_s`` (new requests get a 503, those in flight
    finish), close HTTP, shut Serve and Ray down, end any process of the instance still alive and remove its
    state folder. On a joined cluster, delete the application."""
    global _instance
    import ray

    instance, _instance = _instance, None
    if instance is not None:
        instance.record()
    try:
        if ray.is_initialized():
            from ray import serve

            if instance is None:
                from serve.app.builder import APP_NAME

                serve.delete(APP_NAME)
            else:
                if drain_timeout_s > 0:
                    drain(instance, drain_timeout_s)
                _stop_haproxy(instance)
                serve.shutdown()
            ray.shutdown()
    finally:
        if instance is not None:
            instance.release()
            _restore_environment()


def drain(instance: Instance, timeout_s: float) -> None:
    """Make the Ingress replicas answer new requests with a 503 and wait, up to ``timeout_s``, until none has a
    request in flight."""
    instance.drain_flag.touch()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and requests_in_flight() > 0:
        time.sleep(0.1)


def requests_in_flight() -> int:
    """The requests Serve counts at the Ingress replicas of every application (the count its own graceful
    shutdown waits on), asked of each replica actor."""
    import ray
    from ray.serve._private.common import ReplicaID
    from ray.serve._private.constants import SERVE_NAMESPACE

    replicas = [
        ray.get_actor(actor["name"], namespace=SERVE_NAMESPACE)
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["namespace"] == SERVE_NAMESPACE
        and ReplicaID.is_full_id_str(actor["name"])
        and ReplicaID.from_full_id_str(actor["name"]).deployment_id.name == "Ingress"
    ]
    try:
        return sum(ray.get([replica.get_num_ongoing_requests.remote() for replica in replicas], timeout=5))
    except (ray.exceptions.RayError, TimeoutError):
        return 0  # a replica gone or stuck: nothing more to wait for there


def _stop_haproxy(instance: Instance) -> None:
    """Soft-stop the instance's HAProxy (SIGUSR1): it closes the HTTP port at once, finishes the answers it is
    writing, closes idle connections and exits; after ``HAPROXY_STOP_S`` it is ended."""
    haproxies = []
    for process in instance.processes():
        with contextlib.suppress(psutil.Error):
            if process.name() == "haproxy":
                process.send_signal(signal.SIGUSR1)
                haproxies.append(process)
    _, alive = psutil.wait_procs(haproxies, timeout=HAPROXY_STOP_S)
    end_processes(alive)


def run_until_signalled(
    config: ServiceConfig,
    *,
    dashboard: bool = False,
    num_cpus: int | None = None,
    drain_timeout_s: float | None = None,
) -> int:
    """Serve in the foreground until SIGINT or SIGTERM (also while starting), then stop cleanly, draining for
    ``drain_timeout_s`` (default ``DRAIN_TIMEOUT_S``); returns the process's exit code: 0 after a stop, 1 when
    the service could not start."""
    drain_timeout_s = DRAIN_TIMEOUT_S if drain_timeout_s is None else drain_timeout_s
    stopping = threading.Event()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopping.set())
    started = time.monotonic()
    try:
        url = start(config, dashboard=dashboard, num_cpus=num_cpus, show_logs=True, stopping=stopping)
    except StopRequested:
        print("stopped while starting", flush=True)
        return 0
    except (StartFailed, InstanceBusy) as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    print(
        f"Kosmos-2 ({config.served_model_name}) is ready at {url}/v1 after {time.monotonic() - started:.0f} s; "
        "Ctrl-C or SIGTERM stops it.",
        flush=True,
    )
    while not stopping.wait(timeout=2.0):
        if _instance is not None:
            _instance.record()
    print(f"stopping: draining for up to {drain_timeout_s:g} s, then HAProxy, Serve and Ray...", flush=True)
    stopped = time.monotonic()
    stop(drain_timeout_s)
    print(f"stopped in {time.monotonic() - stopped:.1f} s", flush=True)
    return 0


def _wait_until_ready(url: str, app_name: str, *, own: bool, stopping: threading.Event) -> None:
    """Wait until the application runs and, on this instance's own Ray, ``url``/health answers 200. Raises
    ``StartFailed`` when it fails to deploy. A deployment whose replicas wait to be scheduled (Serve says so
    after 30 s: a cluster short of resources, or workers slow to start on a loaded machine) is reported once,
    and the wait goes on: a cluster may grow, and what a machine of its own lacks was refused before deploying
    (``serve.app.fitting``)."""
    from ray import serve
    from ray.serve.schema import ApplicationStatus

    reported: set[str] = set()
    while True:
        application = serve.status().applications.get(app_name)
        if application is not None:
            if application.status == ApplicationStatus.DEPLOY_FAILED:
                raise StartFailed(f"the application failed to deploy: {application.message}")
            for name, deployment in application.deployments.items():
                if "to be scheduled" in deployment.message and name not in reported:
                    print(f"warning: {deployment.message}", file=sys.stderr, flush=True)
                    reported.add(name)
            if application.status == ApplicationStatus.RUNNING and (not own or _healthy(url)):
                return
        if _instance is not None:
            _instance.record()
        if stopping.wait(POLL_S):
            raise StopRequested


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _set_environment(environment: dict[str, str | None]) -> None:
    """Apply ``environment`` (None removes a variable), keeping what it replaces for ``stop`` to put back."""
    for key, value in environment.items():
        _saved_environment.setdefault(key, os.environ.get(key))
        _put(key, value)


def _restore_environment() -> None:
    for key, value in _saved_environment.items():
        _put(key, value)
    _saved_environment.clear()


def _put(key: str, value: str | None) -> None:
    if value is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = value


def _address(host: str) -> str:
    """An address to reach ``host`` from this machine (a wildcard host is reached on loopback)."""
    return {"0.0.0.0": "127.0.0.1", "::": "[::1]", "": "127.0.0.1"}.get(host, f"[{host}]" if ":" in host else host)

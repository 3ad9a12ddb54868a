"""Overload, client disconnects, replica faults, API keys, remote images and request logs, on real Serve
applications deployed beside the main one. The figures they measure are printed for the README."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from tests.helpers import LOAD_IMAGE, body, storm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tight(deploy_app):
    """Capacity four: the Ingress admits 4 requests, the Generator runs 2 at once."""
    return deploy_app(
        "tight",
        {
            "limits": {"max_inflight": 4, "retry_after_s": 2},
            "ingress": {"max_ongoing_requests": 8},
            "engine": {"max_batch_size": 2},
            "generator": {"max_ongoing_requests": 4, "max_queued_requests": 4},
        },
    )


def test_three_times_capacity_is_answered_quickly(tight):
    results = asyncio.run(storm(tight, clients=12, seconds=8))
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}, statuses  # every request answered: served, or refused with a 503
    assert statuses.count(200) > 0 and statuses.count(503) > 0
    refused = [(latency, headers) for status, latency, headers in results if status == 503]
    assert all(headers.get("retry-after") == "2" for _, headers in refused)
    served = sorted(latency for status, latency, _ in results if status == 200)
    print(
        f"\noverload 3x for 8 s: {len(results)} requests, {statuses.count(200)} served "
        f"(p50 {served[len(served) // 2]:.3f} s), {len(refused)} refused with 503 "
        f"(max {max(latency for latency, _ in refused):.3f} s), 0 unanswered"
    )
    assert httpx.post(f"{tight}/v1/chat/completions", json=body()).status_code == 200


def test_client_disconnect_frees_the_engine(tight):
    generator = serve.get_deployment_handle("Generator", app_name="tight")

    async def leave_early() -> None:
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream("POST", f"{tight}/v1/chat/completions", json=body(max_tokens=150, stream=True)) as response,
        ):
            async for _ in response.aiter_lines():
                break  # the first event arrived: hang up

    asyncio.run(leave_early())
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = generator.stats.remote().result()
        if stats["running"] == 0 and stats["waiting"] == 0:
            break
        time.sleep(0.2)
    assert stats["running"] == 0 and stats["waiting"] == 0


def replica_actors(app: str, deployment: str) -> list[str]:
    return [
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith(f"SERVE_REPLICA::{app}#{deployment}#")
    ]


def survive(url: str, kill: Callable[[], None], what: str) -> list[int]:
    """Three clients for 12 s, ``kill()`` after 3: every request answered (200 or 503), none hung, and the service
    serving again within 90 s. Returns the statuses."""
    results: list = []
    loader = threading.Thread(target=lambda: results.extend(asyncio.run(storm(url, clients=3, seconds=12))))
    loader.start()
    time.sleep(3)
    kill()
    loader.join(timeout=90)
    assert not loader.is_alive()  # nothing hung
    statuses = [status for status, _, _ in results]
    assert set(statuses) <= {200, 503}, statuses
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if httpx.post(f"{url}/v1/chat/completions", json=body(), timeout=30).status_code == 200:
            break
        time.sleep(1)
    else:
        pytest.fail(f"the service did not serve again within 90 s of losing {what}")
    print(f"\nkilled {what} under load: {len(statuses)} requests, {statuses.count(503)} failed with 503")
    return statuses


@pytest.mark.parametrize("deployment", ["Generator", "Preprocessor"])
def test_a_killed_replica_is_replaced_and_nothing_hangs(deploy_app, deployment):
    app = f"faults-{deployment.lower()}"
    url = deploy_app(app, {})
    (victim,) = replica_actors(app, deployment)
    survive(url, lambda: ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True), f"the {deployment}")
    assert replica_actors(app, deployment) not in ([], [victim])


def engine_processes(app: str) -> list[int]:
    """Pids of the engine processes whose parent is one of ``app``'s Generator replicas (``ray::ServeReplica:...``)."""
    processes = {}
    for entry in Path("/proc").iterdir():
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            processes[int(entry.name)] = (parent, (entry / "cmdline").read_bytes())
        except (OSError, ValueError):  # not a process, or ended meanwhile
            continue
    replicas = {pid for pid, (_, command) in processes.items() if f"ServeReplica:{app}:Generator".encode() in command}
    engine = b"serve.engine.process"
    return [pid for pid, (parent, command) in processes.items() if parent in replicas and engine in command]


def test_a_dead_engine_process_fails_fast_and_the_replica_is_replaced(deploy_app):
    url = deploy_app("faults-engine", {})
    (engine,) = engine_processes("faults-engine")
    statuses = survive(url, lambda: os.kill(engine, signal.SIGKILL), "the engine process")
    assert statuses.count(503) >= 1 and statuses.count(200) >= 1  # refused at once while the replica is replaced
    assert engine_processes("faults-engine") not in ([], [engine])


class ImageHandler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(LOAD_IMAGE)))
        self.end_headers()
        self.wfile.write(LOAD_IMAGE)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def secure(deploy_app, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "keys.txt"
    keys.write_text("# one key a line\nsk-first-secret-key\nsk-second-secret-key\n")
    url = deploy_app(
        "secure",
        {
            "http": {
                "api_keys_file": str(keys),
                "allow_remote_images": True,
                "allow_private_addresses": True,
                "remote_image_hosts": ["127.0.0.1"],
            }
        },
    )
    return url, ["sk-first-secret-key", "sk-second-secret-key"]


def test_api_keys(secure):
    url, keys = secure
    for headers in [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {keys[0]}"}]:
        response = httpx.post(f"{url}/v1/chat/completions", json=body(), headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/v1/models", headers=headers).status_code == 401
    for key in keys:
        ok = httpx.post(f"{url}/v1/chat/completions", json=body(), headers={"Authorization": f"Bearer {key}"})
        assert ok.status_code == 200
    assert httpx.get(f"{url}/health").status_code == 200  # probes need no key


def test_remote_image_through_the_service(secure):
    url, keys = secure
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ImageHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        request = body()
        request["messages"][0]["content"][0]["image_url"]["url"] = f"http://127.0.0.1:{httpd.server_address[1]}/a.png"
        auth = {"Authorization": f"Bearer {keys[0]}"}
        remote = httpx.post(f"{url}/v1/chat/completions", json=request, headers=auth)
        inline = httpx.post(f"{url}/v1/chat/completions", json=body(), headers=auth)
        assert remote.status_code == 200 and remote.json()["choices"] == inline.json()["choices"]
    finally:
        httpd.shutdown()


def test_one_log_line_per_request_without_secrets(secure):
    url, keys = secure
    response = httpx.post(f"{url}/v1/chat/completions", json=body(), headers={"Authorization": f"Bearer {keys[1]}"})
    request_id = response.json()["id"]
    logs_dir = os.path.join(ray._private.worker._global_node.get_logs_dir_path(), "serve")
    deadline, lines = time.monotonic() + 20, []
    while time.monotonic() < deadline and not lines:
        for path in glob.glob(os.path.join(logs_dir, "replica_secure_Ingress_*.log")):
            with open(path) as handle:
                lines += [line for line in handle if request_id in line and '"event": "request"' in line]
        time.sleep(0.5)
    assert len(lines) == 1
    record = json.loads(lines[0][lines[0].index("{") :].strip())
    assert record["status"] == 200 and record["task"] == "caption" and record["latency_s"] > 0
    # where the time went: reaching the Preprocessor, preparing the image and prompt, then awaiting the
    # Generator, within the whole
    assert record["queued_s"] > 0 and record["prepare_s"] > 0 and record["generate_s"] > 0
    assert record["queued_s"] + record["prepare_s"] + record["generate_s"] < record["latency_s"]
    for path in glob.glob(os.path.join(logs_dir, "*.log")):
        with open(path, errors="replace") as handle:
            text = handle.read()
        assert not any(key in text for key in keys), path
        assert "base64," not in text, path  # no image bytes either


def test_prometheus_metrics_include_ours(service_url):
    """Ray's metrics agent exports Serve's metrics and ours; the first export can take a few seconds."""
    assert httpx.post(f"{service_url}/v1/chat/completions", json=body()).status_code == 200
    port = ray._private.worker._global_node.metrics_export_port
    wanted = ("kosmos_requests_total", "kosmos_request_latency_seconds", "kosmos_engine_running", "ray_serve_")
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    assert [name for name in wanted if name not in text] == []
    assert 'status="200"' in text and 'task="caption"' in text

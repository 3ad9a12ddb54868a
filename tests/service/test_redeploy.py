"""``serve deploy`` of a Serve config whose ``deployments:`` section changed is a lightweight update: the Generator
replica (same replica id, same process) stays, with the new autoscaling target in force; a change of the
application's ``args`` restarts it. A Ray cluster of its own (with its dashboard, which takes ``serve deploy``),
started in a child process, and Serve's own CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.conftest import ROOT, free_port
from tests.helpers import body

pytestmark = pytest.mark.slow

START = """
import sys, ray
ray.init(address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
         dashboard_port=int(sys.argv[1]), _node_ip_address="127.0.0.1")
print("ready", flush=True)
sys.stdin.read()  # until the test closes it
ray.shutdown()
"""

TOKEN = uuid.uuid4().hex
"""The test cluster's own auth token (Ray 2.60 turns token authentication on), for it and its clients."""

Cluster = tuple[str, dict[str, str]]
"""The dashboard's URL, and the environment Ray's clients of the cluster need."""


def environment(token_file: Path) -> dict[str, str]:
    """This process's environment without what points at another Ray or sets another Serve mode, with the test
    cluster's token."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_SERVE_", "RAY_ADDRESS", "RAY_AUTH"))}
    return {**keep, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    token_file = tmp_path_factory.mktemp("ray") / "auth_token"
    token_file.write_text(TOKEN)
    env = environment(token_file)
    port = free_port()
    child = subprocess.Popen(
        [sys.executable, "-c", START, str(port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    assert child.stdout.readline().strip() == "ready"
    url = f"http://127.0.0.1:{port}"
    yield url, env
    subprocess.run([Path(sys.executable).parent / "serve", "shutdown", "-a", url, "-y"], env=env, timeout=120)
    child.stdin.close()
    child.wait(timeout=120)


def deploy(cluster: Cluster, config: dict[str, Any], path: Path) -> None:
    """``serve deploy`` of ``config``, written to ``path``."""
    url, env = cluster
    path.write_text(yaml.safe_dump(config))
    command = [Path(sys.executable).parent / "serve", "deploy", str(path), "-a", url]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr


def details(cluster: Cluster) -> dict[str, Any]:
    """Serve's details of the cluster's applications (``ServeInstanceDetails``)."""
    url, _ = cluster
    headers = {"Authorization": f"Bearer {TOKEN}"}
    return httpx.get(f"{url}/api/serve/applications/", headers=headers, timeout=30).json()


def settled(cluster: Cluster, target: float) -> dict[str, Any]:
    """The Generator's details once the application runs with ``target`` in force (polled: a deploy is
    asynchronous)."""
    for _ in range(600):
        app = details(cluster).get("applications", {}).get("kosmos2")
        if app and app["status"] == "RUNNING":
            generator = app["deployments"]["Generator"]
            scaling = generator["deployment_config"].get("autoscaling_config") or {}
            in_force = scaling.get("target_ongoing_requests") == target
            if in_force and generator["status"] == "HEALTHY" and replicas(generator):
                return generator
        time.sleep(0.5)
    raise AssertionError(f"the application did not settle with target {target}: {details(cluster)}")


def replicas(generator: dict[str, Any]) -> set[tuple[str, int]]:
    """The running replicas: their ids and processes."""
    return {(r["replica_id"], r["pid"]) for r in generator["replicas"] if r["state"] == "RUNNING"}


def test_changing_the_autoscaling_target_keeps_the_generator(cluster, tiny_dir, tmp_path):
    config = yaml.safe_load((ROOT / "configs" / "local.yaml").read_text())
    port = free_port()
    config["http_options"]["port"] = port
    app = config["applications"][0]
    app["args"]["model"]["source"] = str(tiny_dir)
    generator = app["deployments"][2]
    assert generator["name"] == "Generator"
    del generator["num_replicas"]
    generator["autoscaling_config"] = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 2}
    deploy(cluster, config, tmp_path / "first.yaml")
    before = replicas(settled(cluster, 2))
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    assert httpx.post(url, json=body(), timeout=120).status_code == 200

    generator["autoscaling_config"]["target_ongoing_requests"] = 5
    deploy(cluster, config, tmp_path / "second.yaml")
    after = settled(cluster, 5)
    assert replicas(after) == before, "a lightweight update: the same replica, in the same process"
    assert httpx.post(url, json=body(), timeout=120).status_code == 200

    app["args"]["limits"]["default_max_tokens"] = 32  # a change of args rebuilds the application
    deploy(cluster, config, tmp_path / "third.yaml")
    for _ in range(600):
        rebuilt = replicas(settled(cluster, 5))
        if not rebuilt & before:
            break
        time.sleep(0.5)
    assert rebuilt and not rebuilt & before, "the checks above would see a restart"

"""A local multi-node Ray cluster (a head and three worker nodes, all processes on this machine): the
Preprocessor lands on the CPU-only nodes, the Generator on the node that offers a GPU, and the service
survives losing a worker node. Runs in its own pytest process (``-m multinode``): it owns its Ray cluster."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from serve.app.builder import APP_NAME, build_app
from serve.app.config import ServiceConfig, load_config
from tests.conftest import ROOT, free_port
from tests.helpers import body, storm

pytestmark = [pytest.mark.multinode, pytest.mark.slow]


@pytest.fixture(scope="module")
def cluster(tiny_dir):
    head = {"num_cpus": 1, "resources": {"head": 1}, "include_dashboard": True}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    cpu_nodes = [cluster.add_node(num_cpus=1, resources={"preprocess": 2}) for _ in range(2)]
    gpu_node = cluster.add_node(num_cpus=1, num_gpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    port = free_port()
    config = load_config(ROOT / "configs/local.yaml", model__source=str(tiny_dir), http__port=port)
    data = config.model_dump()
    data["ingress"]["ray_actor_options"]["resources"] = {"head": 0.1}  # as on a real cluster
    data["preprocessor"]["ray_actor_options"]["resources"] = {"preprocess": 1}
    data["generator"]["ray_actor_options"]["num_gpus"] = 1.0
    config = ServiceConfig.model_validate(data)
    # One proxy, on the head, as in configs/*.yaml: with a proxy on every node all would bind 127.0.0.1:port here,
    # and the one that won could be on the node the test removes, dropping its connections.
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(config), name=APP_NAME, route_prefix="/")
    yield cluster, cpu_nodes, gpu_node, f"http://127.0.0.1:{port}"
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


def replica_nodes(deployment: str) -> set[str]:
    actors = list_actors(
        filters=[("class_name", "=", f"ServeReplica:{APP_NAME}:{deployment}"), ("state", "=", "ALIVE")]
    )
    return {actor.node_id for actor in actors}


def test_replicas_land_where_their_resources_are(cluster):
    _, cpu_nodes, gpu_node, url = cluster
    assert replica_nodes("Preprocessor") <= {node.node_id for node in cpu_nodes}
    assert replica_nodes("Generator") == {gpu_node.node_id}
    assert httpx.post(f"{url}/v1/chat/completions", json=body(), timeout=60).status_code == 200


def test_losing_a_worker_node(cluster):
    ray_cluster, cpu_nodes, _, url = cluster
    (first,) = replica_nodes("Preprocessor")
    victim = next(node for node in cpu_nodes if node.node_id == first)
    survivor = next(node for node in cpu_nodes if node is not victim)
    results: list = []
    loader = threading.Thread(target=lambda: results.extend(asyncio.run(storm(url, clients=2, seconds=15))))
    loader.start()
    time.sleep(3)
    ray_cluster.remove_node(victim)
    loader.join(timeout=120)
    assert not loader.is_alive()
    assert {status for status, _, _ in results} <= {200, 503}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if httpx.post(f"{url}/v1/chat/completions", json=body(), timeout=60).status_code == 200:
            break
        time.sleep(1)
    else:
        pytest.fail("the service did not recover within 120 s of losing a node")
    assert replica_nodes("Preprocessor") == {survivor.node_id}
    failed = sum(1 for status, _, _ in results if status != 200)
    print(f"\nlost a worker node under load: {len(results)} requests, {failed} failed with 503, none hung")

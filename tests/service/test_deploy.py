"""``deploy/``, checked offline: the KubeRay manifests against KubeRay's own CRD schemas (vendored in
``tests/fixtures/kuberay``, unknown fields refused) and their Serve config against Serve's schema and ours; the
RayJobs' commands against the command lines' own parsers; the Dockerfile against the pinned Ray; the Grafana
dashboard against the metrics the service exports."""

from __future__ import annotations

import copy
import gzip
import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

import serve.app.metrics as metrics_module
from bench.cli import build_parser as bench_parser
from eval.__main__ import build_parser as eval_parser
from serve.__main__ import build_parser as serve_parser
from serve.app.config import load_config

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SCHEMAS = ROOT / "tests" / "fixtures" / "kuberay"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def crd_schema(plural: str) -> dict[str, Any]:
    """A CRD's v1 schema, with every object that lists its fields closed to others (as ``kubectl apply`` with
    strict field validation refuses them, instead of dropping them)."""
    schema = json.loads(gzip.decompress((SCHEMAS / f"ray.io_{plural}.v1.schema.json.gz").read_bytes()))
    return close(schema)


def close(schema: Any) -> Any:
    if isinstance(schema, list):
        return [close(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: close(value) for key, value in schema.items()}
    open_ended = "additionalProperties" in schema or schema.get("x-kubernetes-preserve-unknown-fields")
    if schema.get("type") == "object" and isinstance(schema.get("properties"), dict) and not open_ended:
        closed["additionalProperties"] = False
    return closed


@pytest.fixture(scope="module")
def rayservice_schema() -> dict[str, Any]:
    return crd_schema("rayservices")


@pytest.fixture(scope="module")
def rayjob_schema() -> dict[str, Any]:
    return crd_schema("rayjobs")


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    (doc,) = documents(DEPLOY / "kuberay" / "rayservice.yaml")
    return doc


@pytest.fixture(scope="module")
def jobs() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in documents(DEPLOY / "kuberay" / "rayjob.yaml")}


@pytest.fixture(scope="module")
def batch_job() -> dict[str, Any]:
    (doc,) = documents(DEPLOY / "kuberay" / "batch-rayjob.yaml")
    return doc


def validate(document: dict[str, Any], schema: dict[str, Any]) -> None:
    jsonschema.Draft7Validator(schema).validate(document)


def containers(cluster: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


# KubeRay's schema


def test_the_rayservice_passes_kuberays_schema(service, rayservice_schema):
    assert (service["apiVersion"], service["kind"]) == ("ray.io/v1", "RayService")
    validate(service, rayservice_schema)


def test_the_rayjobs_pass_kuberays_schema(jobs, batch_job, rayjob_schema):
    assert set(jobs) == {"kosmos2-eval", "kosmos2-bench"}
    for job in [*jobs.values(), batch_job]:
        assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
        validate(job, rayjob_schema)


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda s: s["spec"]["rayClusterConfig"].update(enableInTreeAutoscalling=True), id="misspelt"),
        pytest.param(lambda s: s["spec"]["rayClusterConfig"]["workerGroupSpecs"][1].pop("maxReplicas"), id="missing"),
        pytest.param(
            lambda s: s["spec"]["rayClusterConfig"]["autoscalerOptions"].update(upscalingMode="Fast"), id="enum"
        ),
        pytest.param(lambda s: s["spec"].update(serveConfigV2={"applications": []}), id="config-not-a-string"),
        pytest.param(
            lambda s: s["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0].update(
                imagePullPolicy=3
            ),
            id="wrong-type",
        ),
    ],
)
def test_the_schema_refuses_a_broken_copy(service, rayservice_schema, breakage):
    broken = copy.deepcopy(service)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        validate(broken, rayservice_schema)


# The RayService: its Serve config and its groups


def test_the_serve_config_is_the_clusters(service, tmp_path):
    """The embedded config passes Serve's schema and ours, and is configs/cluster.yaml's (comments aside)."""
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(embedded)
    assert embedded == yaml.safe_load((ROOT / "configs" / "cluster.yaml").read_text())
    (tmp_path / "serve.yaml").write_text(service["spec"]["serveConfigV2"])
    config = load_config(tmp_path / "serve.yaml")
    assert config.cpu_fallback is False and config.http.port == 8000


def test_the_groups_hold_the_deployments(service, tmp_path):
    cluster = service["spec"]["rayClusterConfig"]
    (tmp_path / "serve.yaml").write_text(service["spec"]["serveConfigV2"])
    config = load_config(tmp_path / "serve.yaml")
    assert cluster["enableInTreeAutoscaling"] is True and cluster["rayVersion"] == ray.__version__
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"], "a CPU head"
    assert {port["containerPort"] for port in head["ports"]} >= {6379, 8265, 8000}
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    cpu, gpu = groups["cpu-preprocess"], groups["gpu"]
    gpu_limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert gpu["minReplicas"] == 0 and gpu_limits["nvidia.com/gpu"] == 1, "GPU pods from zero, one GPU each"
    assert gpu["maxReplicas"] * gpu_limits["nvidia.com/gpu"] >= config.generator.replica_range[1]
    offered = json.loads(json.loads(cpu["rayStartParams"]["resources"]))  # KubeRay's quoting: a JSON string
    assert "nvidia.com/gpu" not in cpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert cpu["minReplicas"] == 0 and set(config.preprocessor.ray_actor_options.resources) <= set(offered)
    assert cpu["maxReplicas"] * offered["preprocess"] >= config.preprocessor.replica_range[1]
    for container in containers(cluster):  # requests equal limits: Ray counts what the pod is given
        assert container["resources"]["limits"] == container["resources"]["requests"]


def test_every_pod_runs_the_projects_image_offline_with_keys_from_a_secret(service, jobs):
    clusters = [service["spec"]["rayClusterConfig"], *(job["spec"]["rayClusterSpec"] for job in jobs.values())]
    images = {c["image"] for cluster in clusters for c in containers(cluster)}
    assert images == {f"kosmos2-serve:{PROJECT['version']}"}
    for container in containers(service["spec"]["rayClusterConfig"]):
        env = {e["name"]: e for e in container["env"]}
        assert env["HF_HUB_OFFLINE"]["value"] == "1"
        assert env["KOSMOS_API_KEYS"]["valueFrom"]["secretKeyRef"]["optional"] is True


# The RayJobs


def command(job: dict[str, Any]) -> list[str]:
    return shlex.split(job["spec"]["entrypoint"])


def test_the_jobs_commands_are_valid_command_lines(jobs, service):
    url = f"http://{service['metadata']['name']}-serve-svc:8000"  # the Serve service KubeRay makes
    bench = command(jobs["kosmos2-bench"])
    assert bench[0] == "kosmos2-bench"
    args = bench_parser().parse_args(bench[1:])
    assert (args.command, args.url, str(args.out)) == ("run", url, "/results/bench")
    evaluation = command(jobs["kosmos2-eval"])
    assert evaluation[0] == "kosmos2-eval"
    args = eval_parser().parse_args(evaluation[1:])
    assert (args.command, args.predictor, args.url) == ("run", "api", url)
    assert all(path.startswith("/data/") for path in [*args.annotations, args.images])
    for job in jobs.values():
        assert not any("key" in word.lower() for word in command(job)), "keys travel in the environment only"
        (head,) = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
        assert {e["name"] for e in head["env"]} == {"KOSMOS_API_KEY"}
        assert job["spec"]["shutdownAfterJobFinishes"] is True


def test_the_batch_job_has_an_engine_on_each_gpu_worker_and_its_data_on_every_pod(batch_job):
    words = command(batch_job)
    assert words[:2] == ["kosmos2-serve", "batch"]
    args = serve_parser().parse_args(words[1:])
    assert (args.images, args.output, args.task) == ("/data/images", "/results/captions", "caption")
    cluster = batch_job["spec"]["rayClusterSpec"]
    groups = {group["groupName"]: group for group in cluster["workerGroupSpecs"]}
    gpu = groups["gpu"]
    assert gpu["replicas"] == gpu["minReplicas"] == args.engines  # the engines' GPUs exist when the job starts
    (worker,) = gpu["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    for container in containers(cluster):  # the prepare tasks read the images wherever they run
        assert "/data" in {mount["mountPath"] for mount in container["volumeMounts"]}
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert "/results" in {mount["mountPath"] for mount in head["volumeMounts"]}  # the driver's writes
    assert batch_job["spec"]["shutdownAfterJobFinishes"] is True


# The image


def test_the_dockerfile_builds_on_rays_image_of_the_pinned_version():
    text = (DEPLOY / "Dockerfile").read_text()
    pinned = next(d for d in PROJECT["dependencies"] if d.startswith("ray["))
    assert pinned == f"ray[serve,data]=={ray.__version__}"
    (image,) = re.findall(r"^ARG RAY_IMAGE=(\S+)$", text, re.MULTILINE)
    assert image == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, re.MULTILINE)
    copied = re.findall(r"^COPY --chown=ray:users (.+) \S+$", text, re.MULTILINE)
    sources = [word for line in copied for word in line.split()]
    assert set(sources) == {"pyproject.toml", "constraints.txt", "README.md", "serve", "bench", "eval", "configs"}
    assert all((ROOT / source).exists() for source in sources)
    assert 'pip install --no-cache-dir -c constraints.txt ".[bench,eval]"' in text
    assert "ENV HF_HUB_OFFLINE=1" in text and "hf download" in text
    ignored = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    assert ignored[ignored.index("**") + 1 :][: len(sources)] == [
        f"!{s}/**" if (ROOT / s).is_dir() else f"!{s}" for s in sources
    ]


# The Grafana dashboard


def exported_metrics(monkeypatch) -> dict[str, str]:
    """The service's metrics as Ray's agent exports them to Prometheus (``ray_`` first; histograms as buckets)."""
    made: dict[str, str] = {}

    def recorder(kind: str):
        class Recorded:
            def __init__(self, name: str, **_: Any) -> None:
                made[name] = kind

        return Recorded

    for kind in ("Counter", "Gauge", "Histogram"):
        monkeypatch.setattr(metrics_module, kind, recorder(kind))
    metrics_module.RequestMetrics()
    metrics_module.EngineMetrics()
    return {f"ray_{name}" + ("_bucket" if kind == "Histogram" else ""): kind for name, kind in made.items()}


def test_the_dashboard_charts_every_metric_of_the_service(monkeypatch):
    dashboard = json.loads((DEPLOY / "grafana" / "kosmos2.json").read_text())
    exported = exported_metrics(monkeypatch)
    assert {"ray_kosmos_time_to_first_token_seconds_bucket", "ray_kosmos_request_queued_seconds_bucket"} <= set(
        exported
    )
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    used = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}" and panel["title"] and panel["description"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bray_[a-z_]+", target["expr"]))
            assert names, target["expr"]
            ours = {name for name in names if name.startswith("ray_kosmos_")}
            assert ours <= set(exported), ours - set(exported)
            assert names - ours <= {"ray_serve_deployment_replica_healthy", "ray_node_gpus_utilization"}
            used |= ours
    assert used == set(exported), set(exported) - used
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus" and "Application" in variables

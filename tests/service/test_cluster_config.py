"""The deployment configs, checked with Ray's own validators and ours, offline.

``cluster.yaml`` (the AWS cluster) against the cluster launcher's JSON schema and the checks ``ray up`` runs
before it calls AWS, plus the node groups the service needs. Each Serve config (``configs/*.yaml``) against
Ray Serve's ``ServeDeploySchema``, the options ``serve.deployment`` accepts, and our ``ServiceConfig``; its
``deployments:`` section as ``serve build`` writes it, with every deployment option there and none in ``args``.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import warnings
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray import serve
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.config import AutoscalingConfig
from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

from serve.app.builder import serve_config
from serve.app.config import DEPLOYMENTS, ConfigError, DeploymentConfig, ServiceConfig, load_config

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = ROOT / "cluster.yaml"
SERVE_CONFIGS = {
    name: ROOT / "configs" / f"{name}.yaml" for name in ("autoscale-local", "cluster", "gpu", "local", "perf")
}
RAY_SCHEMA = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
CHECKOUT = "~/kosmos2-serve"

# (vCPUs, GPUs) of the EC2 instance types that cluster.yaml may use.
INSTANCE_TYPES: dict[str, tuple[int, int]] = {
    "m7i.2xlarge": (8, 0),
    "c7i.4xlarge": (16, 0),
    "g6.xlarge": (4, 1),  # NVIDIA L4
    "p5.48xlarge": (192, 8),  # NVIDIA H100
}
GPU_INSTANCE_TYPES = {"g6.xlarge", "p5.48xlarge"}


def load_yaml(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path.name} is not a mapping"
    return data


@pytest.fixture
def cluster() -> dict[str, Any]:
    return load_yaml(CLUSTER)


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    schema = json.loads(RAY_SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    return schema


def workers(cluster: dict[str, Any]) -> dict[str, dict[str, Any]]:
    types = cluster["available_node_types"]
    return {name: spec for name, spec in types.items() if name != cluster["head_node_type"]}


def gpus(spec: dict[str, Any]) -> int:
    return spec["resources"].get("GPU", 0)


def all_commands(cluster: dict[str, Any]) -> list[str]:
    keys = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands")
    keys += ("head_start_ray_commands", "worker_start_ray_commands")
    commands = [command for key in keys for command in cluster.get(key) or []]
    for spec in cluster["available_node_types"].values():
        commands += spec.get("worker_setup_commands") or []
    return commands


# cluster.yaml: Ray's checks


def test_ray_schema_accepts_the_cluster_config(cluster: dict[str, Any], ray_schema: dict[str, Any]) -> None:
    jsonschema.Draft7Validator(ray_schema).validate(cluster)


@pytest.mark.parametrize(
    "breakage",
    [
        pytest.param(lambda c: c["available_node_types"]["gpu-l4"]["resources"].update(GPU=0.5), id="fractional-gpu"),
        pytest.param(lambda c: c.update(max_worker=3), id="misspelt-key"),
        # what YAML makes of an unquoted command holding ": "
        pytest.param(lambda c: c["setup_commands"].append({"echo no": "venv"}), id="command-not-a-string"),
        pytest.param(lambda c: c["available_node_types"]["head"].pop("node_config"), id="no-node-config"),
    ],
)
def test_ray_schema_rejects_a_broken_copy(cluster: dict[str, Any], ray_schema: dict[str, Any], breakage) -> None:
    broken = copy.deepcopy(cluster)
    breakage(broken)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(ray_schema).validate(broken)


def test_ray_up_checks_before_aws_accept_the_cluster_config(cluster: dict[str, Any]) -> None:
    """``ray up`` fills in the provider's defaults, then validates (the AWS calls come after)."""
    prepared = prepare_config(cluster)
    validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0
    # the common setup runs on every node, before the head's and the workers' own commands
    setup = cluster["setup_commands"]
    assert prepared["head_setup_commands"][: len(setup)] == setup
    assert prepared["worker_setup_commands"][: len(setup)] == setup
    assert not any("worker_setup_commands" in spec for spec in workers(cluster).values()), "would replace the setup"


def test_worker_groups(cluster: dict[str, Any]) -> None:
    head = cluster["available_node_types"][cluster["head_node_type"]]
    groups = workers(cluster)
    cpu_groups = [name for name, spec in groups.items() if gpus(spec) == 0]
    gpu_groups = [name for name, spec in groups.items() if gpus(spec) > 0]
    assert gpus(head) == 0 and head["resources"]["CPU"] > 0, "the head is a CPU node that hosts the Ingress"
    assert len(cpu_groups) == 1, cpu_groups
    assert {groups[name]["node_config"]["InstanceType"] for name in gpu_groups} == GPU_INSTANCE_TYPES
    for name, spec in groups.items():
        assert spec["min_workers"] == 0, f"{name}: every group starts empty"
        assert spec["max_workers"] >= 1, name
    assert cluster["max_workers"] == sum(spec["max_workers"] for spec in groups.values())


def test_resources_match_the_instance_types(cluster: dict[str, Any]) -> None:
    for name, spec in cluster["available_node_types"].items():
        instance_type = spec["node_config"]["InstanceType"]
        assert instance_type in INSTANCE_TYPES, f"{name}: add {instance_type} to INSTANCE_TYPES"
        cpus, gpu_count = INSTANCE_TYPES[instance_type]
        assert spec["resources"]["CPU"] == cpus, name
        assert gpus(spec) == gpu_count, name


def test_provider_and_ray_start(cluster: dict[str, Any]) -> None:
    provider = cluster["provider"]
    assert (provider["type"], provider["region"], provider["cache_stopped_nodes"]) == ("aws", "us-west-2", False)
    assert cluster["auth"]["ssh_user"] == "ubuntu"
    assert cluster["idle_timeout_minutes"] > 0 and cluster["upscaling_speed"] > 0
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "ray start --head" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(cluster["worker_start_ray_commands"])


def test_nodes_install_the_synced_checkout_without_touching_torch(cluster: dict[str, Any]) -> None:
    assert cluster["file_mounts"] == {CHECKOUT: "."}
    setup = cluster["setup_commands"]
    installs = [command for command in setup if re.search(rf"pip install .*-e {re.escape(CHECKOUT)}\b", command)]
    assert installs, "no setup command installs the checkout"
    assert all(f"-c {CHECKOUT}/constraints.txt" in command for command in installs)
    for command in all_commands(cluster):
        for match in re.finditer(r"pip install([^;&|]*)", command):
            arguments = [argument.strip("'\"") for argument in match.group(1).split()]
            assert not any(re.match(r"torch($|[=<>~!\[])", argument) for argument in arguments), command


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_every_command_is_valid_shell(cluster: dict[str, Any]) -> None:
    for command in all_commands(cluster):
        assert isinstance(command, str), command
        checked = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True, check=False)
        assert checked.returncode == 0, f"{command}: {checked.stderr}"


def test_the_cluster_can_hold_the_serve_config(cluster: dict[str, Any]) -> None:
    config = load_config(SERVE_CONFIGS["cluster"])
    head = cluster["available_node_types"][cluster["head_node_type"]]
    groups = workers(cluster).values()
    generator, preprocessor, ingress = config.generator, config.preprocessor, config.ingress
    for spec in (spec for spec in groups if gpus(spec) > 0):  # a Generator replica fits any GPU node
        assert generator.num_gpus <= gpus(spec) and generator.num_cpus <= spec["resources"]["CPU"]
    gpu_capacity = sum(spec["max_workers"] * gpus(spec) for spec in groups)
    assert generator.replica_range[1] * generator.num_gpus <= gpu_capacity
    cpu_capacity = sum(spec["max_workers"] * spec["resources"]["CPU"] for spec in groups if gpus(spec) == 0)
    assert preprocessor.replica_range[1] * preprocessor.num_cpus <= cpu_capacity
    assert ingress.replica_range[1] * ingress.num_cpus <= head["resources"]["CPU"]


# Serve configs: Ray Serve's checks and ours


class _Replica:
    """Stands in for the deployed classes: Serve checks the options, not the class."""


def serve_accepts(config: ServiceConfig) -> None:
    """Serve's own checks of each deployment's options (resources, queue bounds, autoscaling)."""
    for name in ("ingress", "preprocessor", "generator"):
        serve.deployment(_Replica, name=name, **getattr(config, name).serve_options())


@pytest.mark.parametrize("name", sorted(SERVE_CONFIGS))
def test_serve_schema_accepts_the_serve_config(name: str) -> None:
    raw = load_yaml(SERVE_CONFIGS[name])
    ServeDeploySchema.model_validate(raw)
    # Serve ignores unknown keys (for forward compatibility): a misspelt one would pass silently
    assert set(raw) <= set(ServeDeploySchema.model_fields), set(raw) - set(ServeDeploySchema.model_fields)
    (app,) = raw["applications"]
    assert set(app) <= set(ServeApplicationSchema.model_fields), set(app) - set(ServeApplicationSchema.model_fields)
    assert (app["name"], app["route_prefix"], app["import_path"]) == ("kosmos2", "/", "serve.app.builder:build_app")


@pytest.mark.parametrize("name", sorted(SERVE_CONFIGS))
def test_deployment_options_are_in_the_deployments_section(name: str) -> None:
    """Each deployment has its entry, in Serve's own fields (none misspelt: Serve would ignore it), with every
    autoscaling field one of Serve's; ``args`` hold no deployment option (its change would restart replicas)."""
    (app,) = load_yaml(SERVE_CONFIGS[name])["applications"]
    assert not set(app["args"]) & set(DEPLOYMENTS.values()), "deployment options belong in deployments:"
    assert [entry["name"] for entry in app["deployments"]] == list(DEPLOYMENTS)
    for entry in app["deployments"]:
        assert set(entry) <= set(DeploymentSchema.model_fields), set(entry) - set(DeploymentSchema.model_fields)
        DeploymentSchema.model_validate(entry)
        assert set(entry.get("autoscaling_config") or {}) <= set(AutoscalingConfig.model_fields)
        assert "num_replicas" in entry or "autoscaling_config" in entry, "say how many replicas"


@pytest.mark.parametrize("name", sorted(SERVE_CONFIGS))
def test_the_file_is_what_serve_build_writes_for_it(name: str, tmp_path) -> None:
    """``serve.app.builder.serve_config`` (Serve's own conversion of the bound deployments, as ``serve build``)
    of the config a file describes describes the same config, deployment for deployment."""
    config = load_config(SERVE_CONFIGS[name])
    written = serve_config(config)
    ServeDeploySchema.model_validate(written)
    (tmp_path / "built.yaml").write_text(yaml.safe_dump(written))
    assert load_config(tmp_path / "built.yaml") == config
    (app,) = load_yaml(SERVE_CONFIGS[name])["applications"]
    (built,) = written["applications"]
    for entry, made in zip(app["deployments"], built["deployments"], strict=True):
        assert entry["name"] == made["name"]
        options = [{k: v for k, v in d.items() if k != "name"} for d in (entry, made)]
        assert DeploymentConfig.model_validate(options[0]) == DeploymentConfig.model_validate(options[1])


def test_a_deployments_entry_overrides_the_defaults_as_serve_does() -> None:
    """Serve applies an entry field by field over the code's options, ``ray_actor_options`` as a whole."""
    config = ServiceConfig.model_validate({"generator": {"max_ongoing_requests": 7}})
    assert (config.generator.max_ongoing_requests, config.generator.num_gpus) == (7, 1)
    config = ServiceConfig.model_validate({"generator": {"ray_actor_options": {"num_cpus": 2}}})
    assert (config.generator.num_cpus, config.generator.num_gpus) == (2, 0)
    scaled = ServiceConfig.model_validate({"preprocessor": {"autoscaling_config": {"max_replicas": 3}}})
    assert scaled.preprocessor.replica_range == (1, 3) and scaled.preprocessor.num_replicas is None


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "Genrator", "num_replicas": 1}, "no deployment 'Genrator'"),
        ({"name": "Generator", "num_replica": 2}, "num_replica"),
        ({"name": "Generator", "autoscaling_config": {"max_replica": 2}}, "max_replica"),
        ({"name": "Generator", "autoscaling_config": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas"),
        ({"name": "Generator", "num_replicas": 2, "autoscaling_config": {"max_replicas": 2}}, "not both"),
        ({"name": "Generator", "ray_actor_options": {"num_gpu": 1}}, "num_gpu"),
    ],
)
def test_a_broken_deployments_entry_is_named(tmp_path, entry: dict[str, Any], message: str) -> None:
    raw = load_yaml(SERVE_CONFIGS["cluster"])
    raw["applications"][0]["deployments"][2] = entry
    (tmp_path / "broken.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message):
        load_config(tmp_path / "broken.yaml")


@pytest.mark.parametrize("name", sorted(SERVE_CONFIGS))
def test_args_are_a_service_config_that_serve_accepts(name: str) -> None:
    raw = load_yaml(SERVE_CONFIGS[name])
    config = load_config(SERVE_CONFIGS[name])
    assert (config.http.host, config.http.port) == (raw["http_options"]["host"], raw["http_options"]["port"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the cluster's own test below turns these into errors
        serve_accepts(config)


def test_cluster_serve_config_values() -> None:
    raw = load_yaml(SERVE_CONFIGS["cluster"])
    config = load_config(SERVE_CONFIGS["cluster"])
    assert raw["proxy_location"] == "HeadOnly"
    assert (config.http.host, config.http.port) == ("0.0.0.0", 8000)
    assert (config.model.source, config.model.dtype) == ("microsoft/kosmos-2-patch14-224", "float16")
    assert (config.engine.kind, config.engine.max_batch_size) == ("fast", 256)
    assert config.cpu_fallback is False, "GPU nodes arrive through the autoscaler, after the deploy"
    assert (config.generator.num_gpus, config.generator.replica_range) == (1, (1, 8))
    assert config.preprocessor.num_gpus == 0 and config.preprocessor.num_cpus == 1
    assert config.preprocessor.replica_range == (2, 32)
    assert config.preprocessor.ray_actor_options.resources == {"preprocess": 1}
    for bounded in (config.ingress, config.generator):
        assert bounded.max_queued_requests > 0, "overload must be answered with a 503, not queued without end"


def test_serve_accepts_the_cluster_config_without_deprecation_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        serve_accepts(load_config(SERVE_CONFIGS["cluster"]))


@pytest.mark.parametrize(
    ("section", "change"),
    [
        ("generator", {"max_queued_requests": 0}),  # Serve: -1 or a positive number
        ("generator", {"ray_actor_options": {"num_gpus": -1}}),
        ("preprocessor", {"autoscaling_config": {"min_replicas": 4, "max_replicas": 2}}),
    ],
)
def test_the_checks_reject_broken_options(section: str, change: dict[str, Any]) -> None:
    config = load_config(SERVE_CONFIGS["cluster"]).model_dump()
    config[section] = {**config[section], **change}
    with pytest.raises(ValueError):  # ours (ConfigError) or Serve's
        serve_accepts(ServiceConfig.model_validate(config))

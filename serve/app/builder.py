"""The one builder: a ``ServiceConfig`` in, the bound Serve application out; and its Serve config file.

    serve run configs/local.yaml                     # Serve's CLI: args and deployments: from the file
    python -m serve run --model ./tiny-kosmos2       # ours: starts Ray and Serve, prints the URL
    python -m serve build --config configs/gpu.yaml  # the Serve config of a ServiceConfig, as serve build writes

Three deployments, each with its resources, replicas and queue bounds from the config:
``Ingress`` (HTTP) -> ``Preprocessor`` (CPU replicas) -> ``Generator`` (GPU replicas). Deployed from a Serve
config file, Serve applies the file's ``deployments:`` entries over the options set here.
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from serve.app.config import DEPLOYMENTS, DeploymentConfig, ServiceConfig
from serve.app.generator import Generator
from serve.app.ingress import HTTPIngress
from serve.app.preprocessor import Preprocessor

log = logging.getLogger("ray.serve")

APP_NAME = "kosmos2"


def build_app(args: ServiceConfig | dict[str, Any] | None = None) -> Application:
    """Bind the three deployments from a config (or the dict of a Serve config file's ``args``)."""
    config = args if isinstance(args, ServiceConfig) else ServiceConfig.model_validate(args)
    return _bind(config, generator_resources(config))


def _bind(config: ServiceConfig, generator_resources: DeploymentConfig) -> Application:
    generator = _deployment(Generator, "Generator", generator_resources, access_log=False).bind(config)
    preprocessor = _deployment(Preprocessor, "Preprocessor", config.preprocessor, access_log=False)
    ingress = _deployment(HTTPIngress, "Ingress", config.ingress, access_log=True)
    return ingress.bind(config, preprocessor.bind(config, generator), generator)


def _deployment(cls: type, name: str, resources: DeploymentConfig, access_log: bool):
    """A deployment with its resources; Serve's access log only where requests enter (the Ingress also writes
    one JSON line per request), as a line per inner call costs CPU on every request."""
    log_config = {"enable_access_log": access_log}
    return serve.deployment(cls, name=name, logging_config=log_config, **resources.serve_options())


def generator_resources(config: ServiceConfig) -> DeploymentConfig:
    """The Generator's resources (the batch mode's engine actors take the same); without GPUs in a running cluster
    (and fallback on), CPU ones. The pixel engine runs on the CPU: it takes no GPU."""
    resources = config.generator
    if resources.num_gpus == 0:
        return resources
    if config.engine.kind != "pixels":
        if not config.cpu_fallback or not ray.is_initialized() or ray.cluster_resources().get("GPU", 0) > 0:
            return resources
        log.warning("the Ray cluster has no GPU: the Generator will run on the CPU (cpu_fallback is on)")
    actor = resources.ray_actor_options.model_copy(update={"num_gpus": 0.0})
    return resources.model_copy(update={"ray_actor_options": actor})


def serve_config(config: ServiceConfig) -> dict[str, Any]:
    """The Serve config file that deploys ``config``: the application's ``args`` (what is not a deployment option,
    less the defaults but for the model's source), and each deployment's options in ``deployments:`` exactly as
    ``serve build`` writes them (Serve's own conversion of the bound deployments, through the same private
    functions of the pinned Ray; their log settings are the code's, not options)."""
    from ray.serve._private.build_app import build_app as build
    from ray.serve.deployment import deployment_to_schema

    built = build(_bind(config, config.generator), name=APP_NAME)  # the options asked for, not this machine's
    by_name = {d.name: deployment_to_schema(d).model_dump(exclude_unset=True) for d in built.deployments}
    deployments = [{k: v for k, v in by_name[name].items() if k != "logging_config"} for name in DEPLOYMENTS]
    args = config.model_dump(mode="json", exclude_defaults=True, exclude={*DEPLOYMENTS.values()})
    args["model"] = {"source": config.model.source, **args.get("model", {})}
    http = args.pop("http", {})
    host, port = http.pop("host", config.http.host), http.pop("port", config.http.port)
    if http:
        args["http"] = http
    application = {"name": APP_NAME, "route_prefix": "/", "import_path": f"{__name__}:build_app", "args": args}
    return {
        "proxy_location": "HeadOnly",
        "http_options": {"host": host, "port": port},
        "applications": [{**application, "deployments": deployments}],
    }

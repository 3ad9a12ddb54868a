"""The one builder: a ``ServiceConfig`` in, the bound Serve application out.

    serve run configs/local.yaml                     # Serve's CLI, args from the file
    python -m serve run --model ./tiny-kosmos2       # ours: starts Ray and Serve, prints the URL

Three deployments, each with its resources, queue bounds and autoscaling from the config:
``Ingress`` (HTTP) -> ``Preprocessor`` (CPU replicas) -> ``Generator`` (GPU replicas).
"""

from __future__ import annotations

import logging
from typing import Any

import ray
from ray import serve
from ray.serve import Application

from serve.app.config import DeploymentConfig, ServiceConfig
from serve.app.generator import Generator
from serve.app.ingress import HTTPIngress
from serve.app.preprocessor import Preprocessor

log = logging.getLogger("ray.serve")

APP_NAME = "kosmos2"


def build_app(args: ServiceConfig | dict[str, Any] | None = None) -> Application:
    """Bind the three deployments from a config (or the dict of a Serve config file's ``args``)."""
    config = args if isinstance(args, ServiceConfig) else ServiceConfig.model_validate(args)
    generator_resources = _gpu_or_fallback(config)
    generator = _deployment(Generator, "Generator", generator_resources, access_log=False).bind(config)
    preprocessor = _deployment(Preprocessor, "Preprocessor", config.preprocessor, access_log=False)
    ingress = _deployment(HTTPIngress, "Ingress", config.ingress, access_log=True)
    return ingress.bind(config, preprocessor.bind(config, generator), generator)


def _deployment(cls: type, name: str, resources: DeploymentConfig, access_log: bool):
    """A deployment with its resources; Serve's access log only where requests enter (the Ingress also writes
    one JSON line per request), as a line per inner call costs CPU on every request."""
    log_config = {"enable_access_log": access_log}
    return serve.deployment(cls, name=name, logging_config=log_config, **resources.serve_options())


def _gpu_or_fallback(config: ServiceConfig) -> DeploymentConfig:
    """The Generator's resources; without GPUs in a running cluster (and fallback on), CPU ones. The pixel engine
    runs on the CPU: it takes no GPU."""
    resources = config.generator
    if config.engine.kind == "pixels":
        return resources.model_copy(update={"num_gpus": 0.0})
    if resources.num_gpus == 0 or not config.cpu_fallback or not ray.is_initialized():
        return resources
    if ray.cluster_resources().get("GPU", 0) > 0:
        return resources
    log.warning("the Ray cluster has no GPU: the Generator will run on the CPU (cpu_fallback is on)")
    return resources.model_copy(update={"num_gpus": 0.0})

"""Fitting the deployments' resource requests to the machine of a Ray instance the launcher started.

On a fixed machine a replica that does not fit is never scheduled: Serve waits for it forever. So before the
application is deployed, ``fit`` checks what the config asks for at start (each deployment's starting replicas
times its request) against what Ray has:

- CPUs: Ray's CPUs are a scheduling budget, not a limit on threads, so when the replicas ask for more than the
  machine has, every replica's ``num_cpus`` is scaled by the same factor and the launcher says so in one line;
- GPUs and custom resources cannot be made up: a deployment that asks for more than the machine has stops the
  start with ``DoesNotFit``, naming the deployment, what it asks, what the machine has and the setting to change.

    >>> from serve.app.config import ServiceConfig
    >>> fitted = fit(ServiceConfig(), {"CPU": 2.0})
    >>> [fitted.config.ingress.num_cpus, fitted.config.preprocessor.num_cpus, fitted.config.generator.num_cpus]
    [0.4, 0.8, 0.8]
    >>> fitted.note.split(":")[0]
    'the replicas ask for 2.5 CPUs and Ray has 2 on this machine'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from serve.app.config import DeploymentConfig, ServiceConfig

SETTINGS = ("ingress", "preprocessor", "generator")
"""The config's section for each deployment, in the order of a request's path."""


class DoesNotFit(RuntimeError):
    """A deployment asks for a resource the machine does not have enough of."""


@dataclass(frozen=True)
class Fitted:
    config: ServiceConfig
    note: str | None
    """One line saying how the requests were scaled, or None where they fit as they were."""


def starting_replicas(deployment: DeploymentConfig) -> int:
    """How many replicas a deployment starts with (at least one: a deployment must be able to serve)."""
    initial = (deployment.autoscaling_config or {}).get("initial_replicas")
    return max(1, initial if initial is not None else deployment.replica_range[0])


def fit(config: ServiceConfig, available: Mapping[str, float]) -> Fitted:
    """``config`` with its CPU requests scaled to ``available`` (Ray's resources), or ``DoesNotFit``."""
    gpus = available.get("GPU", 0.0)
    deployments = {name: getattr(config, name) for name in SETTINGS}
    for name, deployment in deployments.items():
        asked_gpus = deployment.num_gpus * starting_replicas(deployment)
        if name == "generator" and config.cpu_fallback and gpus == 0:
            asked_gpus = 0.0  # the builder runs it on the CPU (serve.app.builder)
        _check(name, "GPU", asked_gpus, gpus, f"{name}.ray_actor_options.num_gpus (or cpu_fallback: true)")
        for resource, amount in (deployment.ray_actor_options.resources or {}).items():
            _check(
                name,
                resource,
                amount * starting_replicas(deployment),
                available.get(resource, 0.0),
                f"{name}.ray_actor_options.resources",
            )
    cpus = available.get("CPU", 0.0)
    asked = {name: d.num_cpus * starting_replicas(d) for name, d in deployments.items()}
    total = sum(asked.values())
    if total <= cpus:
        return Fitted(config, None)
    if cpus <= 0:
        raise DoesNotFit(f"Ray has no CPU on this machine and the replicas ask for {total:g}")
    factor = cpus / total
    scaled = {name: math.floor(d.num_cpus * factor * 1e4) / 1e4 for name, d in deployments.items()}
    update = {name: _with_cpus(deployments[name], scaled[name]) for name in deployments}
    asks = ", ".join(f"{_title(name)} {asked[name]:g}" for name in deployments)
    gets = ", ".join(f"{_title(name)} {scaled[name]:g}" for name in deployments)
    note = (
        f"the replicas ask for {total:g} CPUs and Ray has {cpus:g} on this machine: each replica's num_cpus is "
        f"scaled by {factor:.2f} ({asks} -> {gets} per replica); set each deployment's ray_actor_options.num_cpus "
        "in a config file (--config) or Ray's CPU count (--num-cpus) to choose otherwise"
    )
    return Fitted(config.model_copy(update=update), note)


def _with_cpus(deployment: DeploymentConfig, cpus: float) -> DeploymentConfig:
    actor = deployment.ray_actor_options.model_copy(update={"num_cpus": cpus})
    return deployment.model_copy(update={"ray_actor_options": actor})


def _check(name: str, resource: str, asked: float, has: float, setting: str) -> None:
    if asked > has:
        raise DoesNotFit(
            f"the {_title(name)} deployment asks for {asked:g} {resource} and Ray has {has:g} on this machine: "
            f"set {setting} in a config file (--config)"
        )


def _title(name: str) -> str:
    return name.capitalize()

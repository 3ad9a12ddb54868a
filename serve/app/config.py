"""The one typed configuration of the service, checked when it is built.

Every knob lives here, with its default: the model, the engine, request limits, HTTP, and each deployment's
options (resources, replicas and autoscaling, queue bounds) in Serve's own names. ``serve.app.builder.build_app``
turns a ``ServiceConfig`` into the bound Serve application. A Serve config file (``configs/local.yaml``) holds
the deployments' options in its ``deployments:`` section, as ``serve build`` writes it, so that ``serve deploy``
of a changed one (an autoscaling target, a replica count) is a lightweight update that keeps the replicas; the
application's ``args`` hold the rest, whose change rebuilds the application and restarts every replica.
Unknown or ill-typed fields are refused with a message naming the field.

    >>> ServiceConfig().served_model_name
    'kosmos-2-patch14-224'
    >>> ServiceConfig.model_validate({"engine": {"max_batch_size": 0}})
    Traceback (most recent call last):
    ...
    serve.app.config.ConfigError: engine.max_batch_size: Input should be greater than or equal to 1
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from serve.engine.config import EngineConfig, ModelConfig, Strict
from serve.kosmos2.images import ImageLimits


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field and what is wrong."""


class ActorOptions(Strict):
    """Ray's resources for each replica of a deployment (Serve's ``ray_actor_options``)."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    memory: int | None = Field(None, ge=0, description="bytes reserved for each replica, for placement")
    resources: dict[str, float] | None = Field(None, description="custom Ray resources, for placement")
    accelerator_type: str | None = None


class DeploymentConfig(Strict):
    """One deployment's options in Serve's own names: a ``deployments:`` entry of a Serve config, less its name.

    Replicas: a fixed ``num_replicas``, or ``autoscaling_config`` with any field of Serve's ``AutoscalingConfig``
    (checked by Serve's own model); neither: one replica."""

    num_replicas: int | None = Field(None, ge=0)
    autoscaling_config: dict[str, Any] | None = None
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(-1, ge=-1, description="-1: unbounded")
    ray_actor_options: ActorOptions = ActorOptions()
    health_check_period_s: float | None = Field(None, gt=0)
    health_check_timeout_s: float | None = Field(None, gt=0)
    graceful_shutdown_wait_loop_s: float | None = Field(None, ge=0)
    graceful_shutdown_timeout_s: float | None = Field(None, ge=0)
    max_replicas_per_node: int | None = Field(None, ge=1)

    @field_validator("max_queued_requests")
    @classmethod
    def _bounded_or_unbounded(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be -1 (no limit) or at least 1")
        return value

    @field_validator("autoscaling_config")
    @classmethod
    def _serves_autoscaling(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            from ray.serve.config import AutoscalingConfig  # Serve's own checks, every field it has

            unknown = sorted(set(value) - set(AutoscalingConfig.model_fields))
            if unknown:  # Serve would ignore them, silently
                raise ValueError(f"{', '.join(unknown)}: not fields of Serve's AutoscalingConfig")
            try:
                AutoscalingConfig.model_validate(value)
            except ValidationError as exc:
                raise ValueError(_describe(exc)) from None
        return value

    @model_validator(mode="after")
    def _one_way_to_count(self) -> DeploymentConfig:
        if self.num_replicas is not None and self.autoscaling_config is not None:
            raise ValueError("give num_replicas or autoscaling_config, not both")
        return self

    @property
    def num_cpus(self) -> float:
        return self.ray_actor_options.num_cpus

    @property
    def num_gpus(self) -> float:
        return self.ray_actor_options.num_gpus

    @property
    def replica_range(self) -> tuple[int, int]:
        """The fewest and most replicas it may run."""
        if self.autoscaling_config is None:
            count = 1 if self.num_replicas is None else self.num_replicas
            return count, count
        from ray.serve.config import AutoscalingConfig

        scaling = AutoscalingConfig.model_validate(self.autoscaling_config)
        return scaling.min_replicas, scaling.max_replicas

    def serve_options(self) -> dict[str, Any]:
        """The keyword arguments of ``serve.deployment`` for these options."""
        options = self.model_dump(exclude_none=True)
        if self.num_replicas is None and self.autoscaling_config is None:
            options["num_replicas"] = 1
        return options


class LimitsConfig(Strict):
    """What one request may ask for."""

    max_body_bytes: int = Field(16 * 1024 * 1024, ge=1024)
    max_image_bytes: int = Field(12 * 1024 * 1024, ge=1024)
    max_image_pixels: int = Field(50_000_000, ge=1)
    max_aspect_ratio: float = Field(50.0, ge=1)
    fast_jpeg: bool = Field(False, description="decode JPEGs at reduced scale: faster, pixels differ slightly")
    default_max_tokens: int = Field(64, ge=1)
    request_timeout_s: float = Field(120.0, gt=0)
    max_inflight: int = Field(512, ge=1, description="requests one Ingress replica holds; beyond: 503 at once")
    retry_after_s: float = Field(1.0, gt=0, description="what the Retry-After header of a 503 says")

    def image_limits(self) -> ImageLimits:
        return ImageLimits(self.max_image_bytes, self.max_image_pixels, self.max_aspect_ratio, self.fast_jpeg)


class HTTPConfig(Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    proxy: Literal["haproxy", "serve"] = Field(
        "haproxy",
        description="haproxy: HAProxy straight to the Ingress replicas (Serve's throughput-optimized mode, about "
        "twice the requests per CPU); serve: Serve's Python proxy. Read where Ray starts (serve.app.launch)",
    )
    allow_remote_images: bool = False
    remote_image_hosts: list[str] = Field(default_factory=list, description="allowed hosts; empty: any public")
    remote_image_timeout_s: float = Field(10.0, gt=0)
    allow_private_addresses: bool = Field(False, description="let image URLs reach private networks (intranets)")
    api_keys_env: str = Field("KOSMOS_API_KEYS", description="comma-separated keys; unset: no auth")
    api_keys_file: str | None = Field(None, description="one key a line")


DEPLOYMENTS = {"Ingress": "ingress", "Preprocessor": "preprocessor", "Generator": "generator"}
"""The application's deployments by name, and the ``ServiceConfig`` field that holds each one's options."""


def _deployment(num_cpus: float, max_ongoing_requests: int, num_gpus: float = 0.0) -> DeploymentConfig:
    options = ActorOptions(num_cpus=num_cpus, num_gpus=num_gpus)
    return DeploymentConfig(max_ongoing_requests=max_ongoing_requests, ray_actor_options=options)


class ServiceConfig(Strict):
    """Everything the service needs; build it with ``ServiceConfig.model_validate(dict)`` or ``load_config``."""

    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    limits: LimitsConfig = LimitsConfig()
    http: HTTPConfig = HTTPConfig()
    ingress: DeploymentConfig = _deployment(0.5, 512)
    preprocessor: DeploymentConfig = Field(
        _deployment(1, 256),
        description="holds each request through its generation (it calls the Generator): size its queue for that",
    )
    generator: DeploymentConfig = _deployment(1, 512, num_gpus=1)
    cpu_fallback: bool = Field(
        True,
        description="run the Generator on CPUs when the running cluster has no GPU (on the options built here; "
        "Serve applies a Serve config's deployments: section as written)",
    )

    @model_validator(mode="before")
    @classmethod
    def _over_the_defaults(cls, data: Any) -> Any:
        """A deployment's options given in part override its defaults field by field, as Serve applies a
        ``deployments:`` entry over the options in code (``ray_actor_options`` as a whole, and
        ``autoscaling_config`` in place of ``num_replicas``)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for section in DEPLOYMENTS.values():
            given = data.get(section)
            if isinstance(given, dict):
                merged = {**cls.model_fields[section].default.model_dump(exclude_none=True), **given}
                if "autoscaling_config" in given and "num_replicas" not in given:
                    merged.pop("num_replicas", None)
                data[section] = merged
        return data

    @model_validator(mode="after")
    def _admission_before_queueing(self) -> ServiceConfig:
        if self.ingress.max_ongoing_requests < self.limits.max_inflight:
            raise ValueError(
                f"ingress.max_ongoing_requests ({self.ingress.max_ongoing_requests}) must be at least "
                f"limits.max_inflight ({self.limits.max_inflight}), so that overload is answered at once with a "
                "503 rather than queued by Serve; raise the first or lower the second"
            )
        return self

    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> ServiceConfig:  # type: ignore[override]
        try:
            return super().model_validate(obj or {}, **kwargs)
        except ValidationError as exc:
            raise ConfigError(_describe(exc)) from None

    @property
    def served_model_name(self) -> str:
        return self.model.served_name or Path(self.model.source.rstrip("/")).name

    def api_keys(self) -> frozenset[str]:
        """Keys from the environment variable and the file; empty when auth is off."""
        keys = {k.strip() for k in os.environ.get(self.http.api_keys_env, "").split(",") if k.strip()}
        if self.http.api_keys_file:
            lines = Path(self.http.api_keys_file).read_text().splitlines()
            keys |= {line.strip() for line in lines if line.strip() and not line.startswith("#")}
        return frozenset(keys)


def _describe(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in error['loc']) or 'config'}: {error['msg'].removeprefix('Value error, ')}"
        for error in exc.errors()
    )


def load_config(path: str | Path | None = None, **overrides: Any) -> ServiceConfig:
    """A config from a YAML file: plain ``ServiceConfig`` fields, or a Serve config file (its first application's
    ``args``, its ``deployments:`` entries and the host and port of its ``http_options``). ``overrides`` are
    ``section__field`` values, None ones skipped."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        data = loaded
        if "applications" in loaded:  # a Serve config file
            app = loaded["applications"][0]
            data = dict(app.get("args") or {})
            for entry in app.get("deployments") or []:
                options = dict(entry)
                name = options.pop("name", None)
                if name not in DEPLOYMENTS:
                    raise ConfigError(f"deployments: no deployment {name!r}; the application's are {list(DEPLOYMENTS)}")
                if DEPLOYMENTS[name] in data:
                    raise ConfigError(
                        f"{name}'s options are both in args and in deployments:; keep them in deployments:"
                    )
                data[DEPLOYMENTS[name]] = options
            http = {k: v for k, v in (loaded.get("http_options") or {}).items() if k in ("host", "port")}
            data["http"] = {**http, **data.get("http", {})}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition("__")
        data.setdefault(section, {})[key] = value
    return ServiceConfig.model_validate(data)


def config_from_args(args: Any, **overrides: Any) -> ServiceConfig:
    """The config a command line names: ``args.config`` with the model and engine options the commands share
    (``--model``, ``--dtype``, ``--load-format``, ``--engine``) and ``overrides`` on top."""
    return load_config(
        args.config,
        model__source=args.model,
        model__dtype=args.dtype,
        model__load_format=args.load_format,
        engine__kind=args.engine,
        **overrides,
    )

"""The one typed configuration of the service, checked when it is built.

Every knob lives here, with its default: the model, the engine, request limits, HTTP, and each deployment's
resources, queue bounds and autoscaling. ``serve.app.builder.build_app`` turns a ``ServiceConfig`` into the bound
Serve application; a Serve config file passes the same fields as the application's ``args``
(``configs/local.yaml``). Unknown or ill-typed fields are refused with a message naming the field.

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


class AutoscalingConfig(Strict):
    """Serve's autoscaling for one deployment (``min_replicas == max_replicas`` fixes the count)."""

    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(2.0, gt=0)
    upscale_delay_s: float = Field(5.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=10, description="longer than Serve's 10 s metrics interval")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingConfig:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self

    def serve_options(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class DeploymentConfig(Strict):
    """Resources and queue bounds of one deployment's replicas."""

    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0)
    max_ongoing_requests: int = Field(64, ge=1)
    max_queued_requests: int = Field(-1, ge=-1, description="-1: unbounded")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources, for placement")
    autoscaling: AutoscalingConfig = AutoscalingConfig()

    @field_validator("max_queued_requests")
    @classmethod
    def _bounded_or_unbounded(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be -1 (no limit) or at least 1")
        return value

    def serve_options(self) -> dict[str, Any]:
        """The keyword arguments of ``serve.deployment`` for these settings."""
        scaling = self.autoscaling
        replicas: dict[str, Any] = (
            {"num_replicas": scaling.min_replicas}
            if scaling.min_replicas == scaling.max_replicas
            else {"autoscaling_config": scaling.serve_options()}
        )
        return {
            "ray_actor_options": {
                "num_cpus": self.num_cpus,
                "num_gpus": self.num_gpus,
                "resources": dict(self.resources),
            },
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            **replicas,
        }


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


def _default_generator() -> DeploymentConfig:
    return DeploymentConfig(num_cpus=1, num_gpus=1, max_ongoing_requests=512)


class ServiceConfig(Strict):
    """Everything the service needs; build it with ``ServiceConfig.model_validate(dict)`` or ``load_config``."""

    model: ModelConfig = ModelConfig()
    engine: EngineConfig = EngineConfig()
    limits: LimitsConfig = LimitsConfig()
    http: HTTPConfig = HTTPConfig()
    ingress: DeploymentConfig = DeploymentConfig(num_cpus=0.5, max_ongoing_requests=512)
    preprocessor: DeploymentConfig = Field(
        DeploymentConfig(num_cpus=1, max_ongoing_requests=256),
        description="holds each request through its generation (it calls the Generator): size its queue for that",
    )
    generator: DeploymentConfig = Field(default_factory=_default_generator)
    cpu_fallback: bool = Field(True, description="run the Generator on CPUs when the running cluster has no GPU")

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
    """A config from a YAML file (plain fields, or a Serve config file's first application ``args``)."""
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        data = loaded
        if "applications" in loaded:  # a Serve config file: our fields are the app's args
            data = dict(loaded["applications"][0].get("args") or {})
            http = {k: v for k, v in (loaded.get("http_options") or {}).items() if k in ("host", "port")}
            data["http"] = {**http, **data.get("http", {})}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition("__")
        data.setdefault(section, {})[key] = value
    return ServiceConfig.model_validate(data)

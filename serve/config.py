"""The one typed configuration of the service, checked when it is built.

Every knob lives here, with its default: the model, the engine, request limits, HTTP, and each deployment's
resources, queue bounds and autoscaling. ``serve.app.build_app`` turns a ``ServiceConfig`` into the bound
Serve application; a Serve config file passes the same fields as the application's ``args``
(``configs/local.yaml``). Unknown or ill-typed fields are refused with a message naming the field.

    >>> ServiceConfig().served_model_name
    'kosmos-2-patch14-224'
    >>> ServiceConfig.model_validate({"engine": {"max_batch_size": 0}})
    Traceback (most recent call last):
    ...
    serve.config.ConfigError: engine.max_batch_size: Input should be greater than or equal to 1
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator, model_validator

from serve.images import ImageLimits

DEFAULT_MODEL = "microsoft/kosmos-2-patch14-224"


class ConfigError(ValueError):
    """A configuration that cannot work; the message names the field and what is wrong."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingConfig(_Strict):
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


class DeploymentConfig(_Strict):
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


class ModelConfig(_Strict):
    source: str = Field(DEFAULT_MODEL, description="Hugging Face id or local folder")
    served_name: str | None = Field(None, description="the id clients send as 'model'; default: the folder name")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device: str = "auto"
    load_format: Literal["auto", "dummy"] = Field("auto", description="dummy: random weights, for benchmarks")

    @field_validator("source")
    @classmethod
    def _absolute_if_local(cls, source: str) -> str:
        """A local folder becomes an absolute path, so that replicas find it wherever they run."""
        path = Path(source).expanduser()
        return str(path.resolve()) if path.exists() else source


class EngineConfig(_Strict):
    """Generation: which engine, how many sequences at once, and how long they may be."""

    kind: Literal["fast", "hf"] = Field("fast", description="fast: continuous batching; hf: the reference")
    max_batch_size: int = Field(
        64,
        ge=1,
        le=4096,
        description="sequences generated at once (the fast engine's cache slots: with the real model each takes "
        "about 0.2 MB a token of max_seq_len in float16, 26 GB for 1,024 slots of 128 tokens)",
    )
    max_seq_len: int = Field(256, ge=96, le=2048, description="prompt (about 70 tokens) plus answer")
    cuda_graphs: bool = True
    graph_admission_rows: int = Field(
        256,
        ge=1,
        le=1024,
        description="fast engine: admissions run in chunks of at most this many requests, each replaying a CUDA "
        "graph on CUDA (one per row bucket and prompt width, see warm_admission_widths); without graphs an "
        "admission's kernels launch one by one, about 30 ms of host time that the device waits for unless the "
        "admission is large: on an H200 the service's admissions of 35-45 requests took 1.5 ms a request without "
        "graphs, against 0.73 in one of 512",
    )
    warm_admission_widths: tuple[PositiveInt, ...] = Field(
        (72, 80),
        description="fast engine on CUDA: prompt widths (tokens, rounded up to 8) whose admission graphs, every row "
        "bucket, are captured at start-up rather than at first use, where each capture stalls the running "
        "sequences (default: the widths the brief and the detailed caption's prompts round up to); () captures "
        "every one at first use. With 1,024 slots a Generator started in 50 s on an H200 with them (22 row buckets "
        "a width), in 39 s in the run before without; the row buckets are 34 a width since",
    )
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="fast engine: torch.compile its layers (fused elementwise kernels); auto: on CUDA. Compiling "
        "adds about a minute to a replica's start, less when Inductor's cache in /tmp holds the kernels",
    )
    decode_attention: Literal["auto", "triton", "sdpa"] = Field(
        "auto", description="fast engine's decode attention; auto: the Triton kernel on CUDA when triton imports"
    )
    overlap: bool = Field(
        True,
        description="fast engine: launch each decode step before taking the previous step's tokens, so the host's "
        "book-keeping runs while the device computes; a sequence that ends at its end token costs one more step "
        "(on an H200: 942.6 against 930.5 images/s at a static batch of 1024, 864 against 842 in a closed loop)",
    )
    admit_ratio: float = Field(
        0.25, ge=0, description="fast engine: admit waiting requests once they number this fraction of the running"
    )
    admit_max_steps: int = Field(16, ge=0, description="fast engine: or once they have waited this many decode steps")
    batch_wait_s: float = Field(0.005, ge=0, description="hf engine: how long to gather a batch")
    process_niceness: int = Field(
        -10,
        ge=-20,
        le=19,
        description="the engine process's niceness (below 0 needs root or CAP_SYS_NICE; else it keeps its own), so "
        "that its host thread is not kept waiting for a core by the CPU tier's replicas on the same machine. On an "
        "H200 with 8 Preprocessor and 5 Ingress replicas beside it, -10 took the service from 474.1 to 522.3 "
        "images/s at 1,024 clients",
    )


class LimitsConfig(_Strict):
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


class HTTPConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    proxy: Literal["haproxy", "serve"] = Field(
        "haproxy",
        description="haproxy: HAProxy straight to the Ingress replicas (Serve's throughput-optimized mode, about "
        "twice the requests per CPU); serve: Serve's Python proxy. Read where Ray starts (serve.launch)",
    )
    allow_remote_images: bool = False
    remote_image_hosts: list[str] = Field(default_factory=list, description="allowed hosts; empty: any public")
    remote_image_timeout_s: float = Field(10.0, gt=0)
    allow_private_addresses: bool = Field(False, description="let image URLs reach private networks (intranets)")
    api_keys_env: str = Field("KOSMOS_API_KEYS", description="comma-separated keys; unset: no auth")
    api_keys_file: str | None = Field(None, description="one key a line")


def _default_generator() -> DeploymentConfig:
    return DeploymentConfig(num_cpus=1, num_gpus=1, max_ongoing_requests=512)


class ServiceConfig(_Strict):
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

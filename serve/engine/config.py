"""The engine's configuration: which checkpoint to load and how to generate, checked when it is built.

``serve.app.config.ServiceConfig`` holds these two sections beside the service's own; the engine process
receives them alone (``serve.engine.messages.StartEngine``).

    >>> EngineConfig().kind, ModelConfig().source
    ('fast', 'microsoft/kosmos-2-patch14-224')
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

DEFAULT_MODEL = "microsoft/kosmos-2-patch14-224"


class Strict(BaseModel):
    """A config section: unknown fields are refused, and a built section does not change."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Strict):
    """The checkpoint: where it is, the name clients use, and how to load it."""

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


class EngineConfig(Strict):
    """Generation: which engine, how many sequences at once, and how long they may be."""

    kind: Literal["fast", "hf", "pixels"] = Field(
        "fast",
        description="fast: continuous batching; hf: the reference; pixels: no model, answers that box the pixels "
        "unlike the top-left one, a test and benchmarking aid (serve.engine.pixels, docs/testing.md)",
    )
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
        "graph on CUDA (one per row bucket and prompt width, see warm_admission_widths), since an admission whose "
        "kernels launch one by one keeps the device waiting for about 30 ms of host time",
    )
    warm_admission_widths: tuple[PositiveInt, ...] = Field(
        (72, 80),
        description="fast engine on CUDA: prompt widths (tokens, rounded up to 8) whose admission graphs, every row "
        "bucket, are captured at start-up rather than at first use, where each capture stalls the running "
        "sequences (default: the widths the brief and the detailed caption's prompts round up to); () captures "
        "every one at first use. Each width adds its row buckets' captures to a replica's start",
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
        "book-keeping runs while the device computes; a sequence that ends at its end token costs one more step",
    )
    admit_ratio: float = Field(
        0.25, ge=0, description="fast engine: admit waiting requests once they number this fraction of the running"
    )
    admit_max_steps: int = Field(16, ge=0, description="fast engine: or once they have waited this many decode steps")
    batch_wait_s: float = Field(0.005, ge=0, description="hf and pixels engines: how long to gather a batch")
    process_niceness: int = Field(
        -10,
        ge=-20,
        le=19,
        description="the engine process's niceness (below 0 needs root or CAP_SYS_NICE; else it keeps its own), so "
        "that its host thread, which feeds the GPU, is not kept waiting for a core by the CPU tier's replicas on "
        "the same machine",
    )

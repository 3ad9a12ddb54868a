"""The pricing estimate: each measured throughput (a :class:`Figure`) priced on every instance of the GPU it was
measured on (an :class:`Offer`), at several utilizations (a :class:`PriceRow` each). Pure: summaries in, rows out.

Figures come from the runs' ``summary.json``, labelled by what they measured:

- ``service``: the whole service under load (``python -m bench run``), its fastest point with an error rate of
  at most ``max_error_rate`` and, with an SLO, a p99 latency within it; priced with its CPU tier;
- ``batch``: the batch mode (``python -m serve batch``, its ``summary.json``): the engine fed by Ray Data, with
  the service's CPU work and no HTTP; priced with its CPU tier like the service, from the CPU its own processes
  spent a row;
- ``engine only, static batch`` and ``engine only, closed loop`` (``python -m bench engine``): the engine alone,
  the fastest static batch and the fastest closed loop at each output length. No HTTP, no Ray, no image
  decoding: an upper bound on what a service on that GPU can do, never its price.

The CPU tier of the service is the CPU its processes spend a request (``cpu_per_request.json`` of the
performance run, the load generator left out) times its images/s: the cores a GPU needs beside it. Where an
instance's own vCPUs a GPU cover them, the CPU tier costs nothing more; where they do not (or the source does
not say how many there are), the missing cores are priced at the CPU instance's price a vCPU.

    >>> points = [{"label": "c=1", "images_per_s": 2.0, "latency_p99_s": 0.5, "error_rate": 0.0},
    ...           {"label": "c=8", "images_per_s": 9.0, "latency_p99_s": 3.0, "error_rate": 0.0},
    ...           {"label": "c=64", "images_per_s": 9.5, "latency_p99_s": 9.0, "error_rate": 0.2}]
    >>> best_point(points)["label"], best_point(points, slo_p99_s=1.0)["label"]
    ('c=8', 'c=1')
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from bench.cost import (
    InstancePrice,
    PriceTable,
    break_even_usd_per_hour,
    cost_per_1k_images,
    list_price,
    parse_nodes,
)

SERVICE = "service"
BATCH = "batch"
ENGINE_STATIC = "engine only, static batch"
ENGINE_LOOP = "engine only, closed loop"
KINDS = (SERVICE, BATCH, ENGINE_LOOP, ENGINE_STATIC)
WITH_CPU_TIER = (SERVICE, BATCH)
"""The kinds whose figures include the CPU work beside the GPU (priced as the CPU tier)."""


def best_point(
    points: Sequence[dict[str, Any]], slo_p99_s: float | None = None, max_error_rate: float = 0.01
) -> dict[str, Any] | None:
    """The fastest point with errors under ``max_error_rate`` and p99 within the SLO (None if none is)."""
    admissible = [
        p
        for p in points
        if p.get("images_per_s", 0) > 0
        and (p.get("error_rate") or 0.0) <= max_error_rate
        and (slo_p99_s is None or (p.get("latency_p99_s") is not None and p["latency_p99_s"] <= slo_p99_s))
    ]
    return max(admissible, key=lambda p: p["images_per_s"], default=None)


def bench_host(hardware: dict[str, Any]) -> str:
    """The machine the bench ran on, in a few words: its GPUs, else its CPU.

    >>> bench_host({"gpus": ["NVIDIA H200"], "cpu_model": "AMD EPYC"}), bench_host({"cpu_model": "AMD EPYC"})
    ('NVIDIA H200', 'AMD EPYC')
    """
    return ", ".join(hardware.get("gpus") or []) or hardware.get("cpu_model") or "unknown"


@dataclass(frozen=True)
class Figure:
    """One measured throughput to price: which run, what it measured, on which GPU, at what output length."""

    run: str
    kind: str
    point: str
    gpu: str
    images_per_s: float
    new_tokens: int | None
    """Exactly this many new tokens a request (ignore_eos); None when answers stopped at their end token."""
    tokens_per_request: float | None = None
    latency_p99_s: float | None = None
    gpus: int = 1
    cpu_ms_per_request: float | None = None
    """The service's CPU milliseconds a request (service figures only)."""
    started_at: str | None = None
    commit: str | None = None


def figures_of(
    run: str,
    summary: dict[str, Any],
    cpu_ms_per_request: float | None = None,
    slo_p99_s: float | None = None,
    max_error_rate: float = 0.01,
) -> list[Figure]:
    """The figures a run's summary holds: the service's best admissible point, a batch run's throughput, or the
    engine's best static batch and best closed loop at each output length. ``cpu_ms_per_request`` is the service's
    (a batch summary holds its own)."""
    config = summary.get("config", {})
    workload = config.get("workload", {})
    fixed = bool(config.get("output_lengths") or workload.get("ignore_eos"))
    common = {"run": run, "started_at": summary.get("started_at"), "commit": summary.get("git_commit")}
    if summary.get("kind") == "engine":
        gpu = summary.get("gpu") or bench_host(summary.get("hardware") or {})
        figures = []
        for kind, points in ((ENGINE_STATIC, summary["points"]), (ENGINE_LOOP, summary.get("continuous") or [])):
            lengths = dict.fromkeys(p.get("max_tokens") or workload.get("max_tokens") for p in points)
            for tokens in lengths:
                mine = [p for p in points if (p.get("max_tokens") or workload.get("max_tokens")) == tokens]
                best = max(mine, key=lambda p: p["images_per_s"])
                label = (
                    f"{best['path']} batch {best['batch_size']}"
                    if kind == ENGINE_STATIC
                    else (f"{best['path']} {best['concurrency']} in flight")
                )
                per_request = best.get("completion_tokens_mean") or (
                    best["tokens_per_s"] / best["images_per_s"] if best.get("images_per_s") else None
                )
                figures.append(
                    Figure(
                        kind=kind,
                        point=label,
                        gpu=gpu,
                        images_per_s=best["images_per_s"],
                        new_tokens=tokens if fixed else None,
                        tokens_per_request=per_request,
                        latency_p99_s=best.get("latency_p99_s"),
                        **common,
                    )
                )
        return figures
    hardware = summary.get("hardware") or {}
    batch = summary.get("kind") == BATCH
    point = best_point(summary["points"], None if batch else slo_p99_s, max_error_rate)
    if point is None:
        return []
    if batch:
        cpu_ms_per_request = point.get("cpu_ms_per_request")
    return [
        Figure(
            kind=BATCH if batch else SERVICE,
            point=point.get("label", ""),
            gpu=bench_host(hardware),
            images_per_s=point["images_per_s"],
            new_tokens=workload.get("max_tokens") if fixed else None,
            tokens_per_request=point.get("completion_tokens_mean"),
            latency_p99_s=point.get("latency_p99_s"),
            gpus=max(1, len(hardware.get("gpus") or [])),
            cpu_ms_per_request=cpu_ms_per_request,
            **common,
        )
    ]


@dataclass(frozen=True)
class Offer:
    """A price to put a figure on: one GPU's share of a priced instance, or a node set given with ``--nodes``."""

    name: str
    provider: str
    instance: str
    pricing: str
    region: str
    date: str
    source: str
    usd_per_hour: float
    """One GPU's share (an instance row), or the whole node set (``--nodes``)."""
    derived: bool
    vcpus_per_gpu: float | None = None
    cpu_tier: bool = True
    """Whether the service's CPU tier is added (not for a node set given whole)."""

    @classmethod
    def of(cls, price: InstancePrice) -> Offer:
        return cls(
            price.name,
            price.provider,
            price.instance or price.name,
            price.pricing,
            price.region,
            f"{price.date} ({price.date_kind})",
            price.source,
            price.gpu_usd_per_hour,
            price.gpu_price_derived,
            price.vcpus_per_gpu,
        )

    @classmethod
    def node_set(cls, spec: str, table: PriceTable) -> Offer:
        rows = [table.price(node.instance) for node in parse_nodes(spec)]
        usd = table.usd_per_hour(parse_nodes(spec))
        return cls(
            spec,
            ", ".join(dict.fromkeys(r.provider for r in rows)),
            spec,
            ", ".join(dict.fromkeys(r.pricing for r in rows)),
            ", ".join(dict.fromkeys(r.region for r in rows)),
            ", ".join(dict.fromkeys(f"{r.date} ({r.date_kind})" for r in rows)),
            " ".join(dict.fromkeys(r.source for r in rows)),
            usd,
            any(node.per_gpu and r.gpu_price_derived for node, r in zip(parse_nodes(spec), rows)),
            cpu_tier=False,
        )


def accelerator_matches(accelerator: str | None, gpu: str) -> bool:
    """Whether a price row's GPU model is the GPU a run measured (as a whole word: L4 is not L40S).

    >>> accelerator_matches("H200", "NVIDIA H200"), accelerator_matches("L4", "NVIDIA L40S")
    (True, False)
    """
    return bool(accelerator) and re.search(rf"\b{re.escape(accelerator)}\b", gpu, re.IGNORECASE) is not None


def offers_for(gpu: str, table: PriceTable) -> list[Offer]:
    """Every priced instance of the GPU ``gpu`` names, on-demand first."""
    rows = [p for p in table.gpu_rows() if accelerator_matches(p.accelerator, gpu)]
    rows.sort(key=lambda p: (p.pricing != "on-demand", p.provider, p.name))
    return [Offer.of(p) for p in rows]


@dataclass
class PriceRow:
    """A figure priced on one offer: costs per 1,000 images at each utilization, the CPU tier, the break-even."""

    figure: Figure
    offer: Offer
    cpu_cores_needed: float | None
    cpu_usd_per_hour: float
    usd_per_hour: float
    cost_usd: dict[float, float | None]
    list_price_usd: dict[float, float | None]
    vs_reference: dict[float, float | None]
    break_even_usd_per_gpu_hour: dict[float, float]
    margin: float
    reference_usd_per_1k: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A flat record for the CSV: the figure's and the offer's fields, then one column per utilization."""
        figure = {f"figure_{k}": v for k, v in asdict(self.figure).items()}
        offer = {f"offer_{k}": v for k, v in asdict(self.offer).items()}
        flat = {
            **figure,
            **offer,
            "cpu_cores_needed": self.cpu_cores_needed,
            "cpu_usd_per_hour": self.cpu_usd_per_hour,
            "usd_per_hour": self.usd_per_hour,
        }
        for u in self.cost_usd:
            key = f"{u:.0%}".replace("%", "pct")
            flat[f"cost_per_1k_usd_at_{key}"] = self.cost_usd[u]
            flat[f"list_price_per_1k_usd_at_{key}"] = self.list_price_usd[u]
            flat[f"cost_vs_reference_at_{key}"] = self.vs_reference[u]
            flat[f"break_even_usd_per_gpu_hour_at_{key}"] = self.break_even_usd_per_gpu_hour[u]
        return {**flat, "reference_usd_per_1k_images": self.reference_usd_per_1k, "notes": "; ".join(self.notes)}


def price_row(
    figure: Figure,
    offer: Offer,
    utilizations: Sequence[float],
    margin: float,
    reference_usd_per_1k: float,
    cpu_usd_per_vcpu_hour: float | None,
) -> PriceRow:
    """Price ``figure`` on ``offer`` at each utilization; the service's CPU tier where its vCPUs fall short."""
    notes = []
    gpu_usd = offer.usd_per_hour * (figure.gpus if offer.cpu_tier else 1)
    cores = figure.cpu_ms_per_request * figure.images_per_s / 1000 / figure.gpus if figure.cpu_ms_per_request else None
    cpu_usd = 0.0
    if figure.kind in WITH_CPU_TIER and offer.cpu_tier:
        if cores is None:
            notes.append("CPU tier unknown: no CPU a request was measured")
        else:
            included = offer.vcpus_per_gpu or 0.0
            missing = max(0.0, cores - included) * figure.gpus
            if missing and cpu_usd_per_vcpu_hour is None:
                notes.append(f"{missing:.1f} vCPUs short and no CPU instance priced")
            cpu_usd = missing * (cpu_usd_per_vcpu_hour or 0.0)
            if offer.vcpus_per_gpu is None:
                notes.append("vCPUs a GPU not stated: the whole CPU tier priced as separate vCPUs")
    usd = gpu_usd + cpu_usd
    costs = {u: cost_per_1k_images(usd, figure.images_per_s, u) for u in utilizations}
    return PriceRow(
        figure=figure,
        offer=offer,
        cpu_cores_needed=cores,
        cpu_usd_per_hour=cpu_usd,
        usd_per_hour=usd,
        cost_usd=costs,
        list_price_usd={u: list_price(c, margin) if c is not None else None for u, c in costs.items()},
        vs_reference={u: c / reference_usd_per_1k if c is not None else None for u, c in costs.items()},
        break_even_usd_per_gpu_hour={
            u: (break_even_usd_per_hour(reference_usd_per_1k, figure.images_per_s, u) - cpu_usd) / figure.gpus
            for u in utilizations
        },
        margin=margin,
        reference_usd_per_1k=reference_usd_per_1k,
        notes=notes,
    )

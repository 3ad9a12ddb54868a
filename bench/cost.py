"""Dollars per 1,000 images: the price table (``configs/prices.yaml``), node specs and the cost formula.

    $/1k images = Σ node $/h ÷ (images/s × 3600) × 1000 ÷ utilization

for the set of nodes the measured service actually ran on, at the measured throughput. ``utilization`` is the
fraction of paid hours that carry load at that throughput (1.0: a fully loaded fleet; real fleets idle part
of the time). A list price at gross margin ``m`` is ``cost ÷ (1 − m)``. The formula functions are pure; only
:func:`load_prices` reads a file.

Each row of the table is one published price: an instance at one pricing (on-demand, spot, committed), with
its provider, region, the date the price was read and the page it was read from. A row gives either the
instance's price (``usd_per_hour``) or, where the source publishes it so, one GPU's (``usd_per_gpu_hour``); the
other is derived (× or ÷ the instance's GPUs) and marked as derived wherever it is shown.

A node spec names rows of the table: ``g5.xlarge`` (one instance), ``m7g.large*2`` (two),
``p5en.48xlarge/gpu`` (one GPU's share of a multi-GPU instance), joined by commas:

    >>> table = PriceTable({"g5.xlarge": InstancePrice("g5.xlarge", usd_per_hour=1.006, gpus=1),
    ...                     "p5.48xlarge": InstancePrice("p5.48xlarge", usd_per_hour=55.04, gpus=8)}, 0.626)
    >>> table.usd_per_hour(parse_nodes("g5.xlarge*2,p5.48xlarge/gpu"))
    8.892
    >>> round(cost_per_1k_images(1.006, 10.0), 6), round(cost_per_1k_images(1.006, 10.0, utilization=0.5), 6)
    (0.027944, 0.055889)
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from serve.app.shipped import config_path

DEFAULT_PRICES = config_path("prices.yaml")
"""The price table shipped with the project (``configs/prices.yaml``)."""

PRICINGS = ("on-demand", "spot", "1-year committed", "3-year committed", "reserved")
"""The kinds of price a row may hold."""

DATE = re.compile(r"\d{4}-\d{2}(-\d{2})?")


@dataclass(frozen=True)
class InstancePrice:
    """One published price of one instance type, and what the instance holds."""

    name: str
    usd_per_hour: float | None = None
    gpus: int = 0
    usd_per_gpu_hour: float | None = None
    provider: str = ""
    instance: str = ""
    """The provider's name for the instance (``name`` is the table's key, unique per pricing)."""
    accelerator: str | None = None
    """The GPU model the bench reports name it by, e.g. H200 (matched against the GPU a run measured)."""
    gpu: str | None = None
    vcpus: int | None = None
    memory_gib: float | None = None
    pricing: str = "on-demand"
    region: str = ""
    date: str = ""
    date_kind: str = "read"
    """``published``: the date the source states for the price; ``read``: when the source read it."""
    source: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        if (self.usd_per_hour is None) == (self.usd_per_gpu_hour is None):
            raise ValueError(f"{self.name}: give usd_per_hour or usd_per_gpu_hour, one of them")
        if self.usd_per_gpu_hour is not None and self.gpus < 1:
            raise ValueError(f"{self.name}: a price per GPU needs the instance's GPUs")

    @property
    def instance_usd_per_hour(self) -> float:
        """The whole instance's price an hour (derived from the per-GPU price where that was published)."""
        if self.usd_per_hour is not None:
            return self.usd_per_hour
        return round(self.usd_per_gpu_hour * self.gpus, 6)

    @property
    def gpu_usd_per_hour(self) -> float | None:
        """One GPU's share an hour (derived from the instance price where that was published); None without
        GPUs."""
        if self.usd_per_gpu_hour is not None:
            return self.usd_per_gpu_hour
        return round(self.usd_per_hour / self.gpus, 6) if self.gpus else None

    @property
    def gpu_price_derived(self) -> bool:
        """Whether the per-GPU price is derived (a multi-GPU instance's ÷ its GPUs) rather than published."""
        return self.usd_per_gpu_hour is None and self.gpus > 1

    @property
    def instance_price_derived(self) -> bool:
        """Whether the instance's price is derived (a published per-GPU price × its GPUs)."""
        return self.usd_per_hour is None and self.gpus > 1

    @property
    def vcpus_per_gpu(self) -> float | None:
        return self.vcpus / self.gpus if self.vcpus and self.gpus else None


@dataclass(frozen=True)
class Reference:
    """The hosted price ours is compared with: dollars per 1,000 images, what it is, when and from where."""

    usd_per_1k_images: float
    name: str = "reference"
    basis: str = ""
    date: str = ""
    source: str = ""


@dataclass(frozen=True)
class NodeSpec:
    """``count`` instances (or, with ``per_gpu``, ``count`` GPUs' shares) of one instance type."""

    instance: str
    count: float = 1.0
    per_gpu: bool = False

    def __str__(self) -> str:
        share = "/gpu" if self.per_gpu else ""
        return f"{self.instance}{share}" + (f"*{self.count:g}" if self.count != 1 else "")


@dataclass(frozen=True)
class PriceTable:
    """Instance prices by name and the reference price per 1,000 images."""

    instances: dict[str, InstancePrice]
    reference_usd_per_1k: float
    reference_name: str = "reference"
    reference: Reference | None = None

    def price(self, name: str) -> InstancePrice:
        if name not in self.instances:
            raise ValueError(f"no price for instance {name!r}; known: {', '.join(sorted(self.instances))}")
        return self.instances[name]

    def usd_per_hour(self, nodes: Sequence[NodeSpec]) -> float:
        """What the node set costs per hour."""
        total = 0.0
        for node in nodes:
            price = self.price(node.instance)
            if node.per_gpu and price.gpus < 1:
                raise ValueError(f"{node.instance} has no GPUs, so '{node.instance}/gpu' prices nothing")
            total += node.count * (price.gpu_usd_per_hour if node.per_gpu else price.instance_usd_per_hour)
        return round(total, 6)

    def gpu_rows(self) -> list[InstancePrice]:
        return [p for p in self.instances.values() if p.gpus > 0]


def parse_nodes(text: str) -> list[NodeSpec]:
    """Node specs from ``NAME[/gpu][*COUNT],...``.

    >>> [str(node) for node in parse_nodes("g5.xlarge, m7g.large*2, p5.48xlarge/gpu")]
    ['g5.xlarge', 'm7g.large*2', 'p5.48xlarge/gpu']
    >>> parse_nodes("p5.48xlarge/gpu*2")
    [NodeSpec(instance='p5.48xlarge', count=2.0, per_gpu=True)]
    """
    nodes = []
    for part in text.split(","):
        name, _, count = part.strip().partition("*")
        per_gpu = name.endswith("/gpu")
        name = name.removesuffix("/gpu")
        if not name or (count and not _positive(count)):
            raise ValueError(f"a node spec is NAME[/gpu][*COUNT], e.g. g5.xlarge or m7g.large*2; got {part!r}")
        nodes.append(NodeSpec(name, float(count) if count else 1.0, per_gpu))
    return nodes


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def cost_per_1k_images(usd_per_hour: float, images_per_s: float, utilization: float = 1.0) -> float | None:
    """Dollars per 1,000 images for nodes costing ``usd_per_hour`` at ``images_per_s``; None without throughput.

    >>> cost_per_1k_images(3.6, 1.0)  # $3.60/h at one image a second: a tenth of a cent an image
    1.0
    >>> cost_per_1k_images(3.6, 0.0) is None
    True
    """
    if not 0 < utilization <= 1:
        raise ValueError(f"utilization must be in (0, 1], got {utilization}")
    if images_per_s <= 0:
        return None
    return usd_per_hour / (images_per_s * 3600) * 1000 / utilization


def break_even_usd_per_hour(reference_usd_per_1k: float, images_per_s: float, utilization: float = 1.0) -> float:
    """The hourly price at which nodes serving ``images_per_s`` cost the reference price per 1,000 images.

    >>> break_even_usd_per_hour(1.0, 1.0), break_even_usd_per_hour(1.0, 1.0, utilization=0.5)
    (3.6, 1.8)
    """
    return reference_usd_per_1k * images_per_s * 3.6 * utilization


def list_price(cost_usd: float, margin: float) -> float:
    """The price that leaves a gross margin ``margin`` (a fraction of the price) over ``cost_usd``.

    >>> list_price(0.3, 0.4)
    0.5
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    return cost_usd / (1 - margin)


REQUIRED = ("name", "provider", "pricing", "region", "date", "source")


def load_prices(path: str | Path = DEFAULT_PRICES) -> PriceTable:
    """The price table in a YAML file (see ``configs/prices.yaml`` for the fields); every row must say its
    provider, pricing, region, date and source."""
    data: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {}
    known = {f.name for f in fields(InstancePrice)}
    instances = {}
    for entry in data.get("instances", []):
        entry = {k: str(v) if k == "date" else v for k, v in entry.items()}
        unknown, missing = set(entry) - known, [k for k in REQUIRED if not entry.get(k)]
        if unknown or missing:
            raise ValueError(
                f"{path}: each instance needs {', '.join(REQUIRED)} and a price and takes only "
                f"{', '.join(sorted(known))}; got {entry}"
            )
        if entry["pricing"] not in PRICINGS or not DATE.fullmatch(entry["date"]):
            raise ValueError(f"{path}: pricing is one of {', '.join(PRICINGS)} and date YYYY-MM[-DD]; got {entry}")
        if entry["name"] in instances:
            raise ValueError(f"{path}: {entry['name']!r} appears twice")
        instances[entry["name"]] = InstancePrice(**entry)
    raw = data.get("reference") or {}
    if "usd_per_1k_images" not in raw:
        raise ValueError(f"{path}: needs reference.usd_per_1k_images, the price ours is compared with")
    reference = Reference(
        float(raw["usd_per_1k_images"]),
        raw.get("name", "reference"),
        raw.get("basis", ""),
        str(raw.get("date", "")),
        raw.get("source", ""),
    )
    return PriceTable(instances, reference.usd_per_1k_images, reference.name, reference)

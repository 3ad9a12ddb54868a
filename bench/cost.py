"""Dollars per 1,000 images: the price table (``configs/prices.yaml``), node specs and the cost formula.

    $/1k images = Σ node $/h ÷ (images/s × 3600) × 1000 ÷ utilization

for the set of nodes the measured service actually ran on, at the measured throughput. ``utilization`` is the
fraction of paid hours that carry load at that throughput (1.0: a fully loaded fleet; real fleets idle part
of the time). A list price at gross margin ``m`` is ``cost ÷ (1 − m)``. The formula functions are pure; only
:func:`load_prices` reads a file.

A node spec names instances of the price table: ``g5.xlarge`` (one), ``c7i.2xlarge*2`` (two),
``p5.48xlarge/gpu`` (one GPU's share of a multi-GPU instance), joined by commas:

    >>> table = PriceTable({"g5.xlarge": InstancePrice("g5.xlarge", usd_per_hour=1.006, gpus=1),
    ...                     "p5.48xlarge": InstancePrice("p5.48xlarge", usd_per_hour=98.32, gpus=8)}, 0.626)
    >>> table.usd_per_hour(parse_nodes("g5.xlarge*2,p5.48xlarge/gpu"))
    14.302
    >>> round(cost_per_1k_images(1.006, 10.0), 6), round(cost_per_1k_images(1.006, 10.0, utilization=0.5), 6)
    (0.027944, 0.055889)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from serve.app.shipped import config_path

DEFAULT_PRICES = config_path("prices.yaml")
"""The price table shipped with the project (``configs/prices.yaml``)."""


@dataclass(frozen=True)
class InstancePrice:
    """One instance type's on-demand list price and what it holds."""

    name: str
    usd_per_hour: float
    gpus: int = 0
    provider: str = ""
    region: str = ""
    gpu: str | None = None
    vcpus: int | None = None
    memory_gib: float | None = None
    source: str = ""
    captured: str = ""


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
            total += node.count * (price.usd_per_hour / price.gpus if node.per_gpu else price.usd_per_hour)
        return round(total, 6)


def parse_nodes(text: str) -> list[NodeSpec]:
    """Node specs from ``NAME[/gpu][*COUNT],...``.

    >>> [str(node) for node in parse_nodes("g5.xlarge, c7i.2xlarge*2, p5.48xlarge/gpu")]
    ['g5.xlarge', 'c7i.2xlarge*2', 'p5.48xlarge/gpu']
    >>> parse_nodes("p5.48xlarge/gpu*2")
    [NodeSpec(instance='p5.48xlarge', count=2.0, per_gpu=True)]
    """
    nodes = []
    for part in text.split(","):
        name, _, count = part.strip().partition("*")
        per_gpu = name.endswith("/gpu")
        name = name.removesuffix("/gpu")
        if not name or (count and not _positive(count)):
            raise ValueError(f"a node spec is NAME[/gpu][*COUNT], e.g. g5.xlarge or c7i.2xlarge*2; got {part!r}")
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


def list_price(cost_usd: float, margin: float) -> float:
    """The price that leaves a gross margin ``margin`` (a fraction of the price) over ``cost_usd``.

    >>> list_price(0.3, 0.4)
    0.5
    """
    if not 0 <= margin < 1:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    return cost_usd / (1 - margin)


def load_prices(path: str | Path = DEFAULT_PRICES) -> PriceTable:
    """The price table in a YAML file (see ``configs/prices.yaml`` for the fields)."""
    data: dict[str, Any] = yaml.safe_load(Path(path).read_text()) or {}
    known = {f.name for f in fields(InstancePrice)}
    instances = {}
    for entry in data.get("instances", []):
        unknown = set(entry) - known
        if unknown or "name" not in entry or "usd_per_hour" not in entry:
            raise ValueError(
                f"{path}: each instance needs name and usd_per_hour and takes only {', '.join(sorted(known))}; "
                f"got {entry}"
            )
        entry = {**entry, "captured": str(entry.get("captured", ""))}
        instances[entry["name"]] = InstancePrice(**entry)
    reference = data.get("reference") or {}
    if "usd_per_1k_images" not in reference:
        raise ValueError(f"{path}: needs reference.usd_per_1k_images, the price ours is compared with")
    return PriceTable(instances, float(reference["usd_per_1k_images"]), reference.get("name", "reference"))

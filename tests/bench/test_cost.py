"""The cost formula, node specs, the shipped price table and the pricing estimate, against hand-computed values."""

from __future__ import annotations

import re

import pytest

from bench.cost import (
    DEFAULT_PRICES,
    InstancePrice,
    PriceTable,
    cost_per_1k_images,
    list_price,
    load_prices,
    parse_nodes,
)
from bench.pricing import best_point, price_row

TABLE = PriceTable(
    {
        "g5.xlarge": InstancePrice("g5.xlarge", 1.006, gpus=1),
        "c7i.2xlarge": InstancePrice("c7i.2xlarge", 0.357),
        "p5.48xlarge": InstancePrice("p5.48xlarge", 98.32, gpus=8),
    },
    reference_usd_per_1k=0.626,
)


def test_cost_per_1k_images():
    # $1.006/h at 10 images/s: 36,000 images an hour, so $1.006 / 36 per 1,000 images.
    assert cost_per_1k_images(1.006, 10.0) == pytest.approx(1.006 / 36)
    assert cost_per_1k_images(1.006, 10.0, utilization=0.25) == pytest.approx(4 * 1.006 / 36)
    # A GPU node plus two CPU nodes at 50 images/s.
    usd = TABLE.usd_per_hour(parse_nodes("g5.xlarge,c7i.2xlarge*2"))
    assert usd == pytest.approx(1.72)
    assert cost_per_1k_images(usd, 50.0) == pytest.approx(1.72 / 180)
    assert cost_per_1k_images(usd, 0.0) is None
    for utilization in (0.0, 1.5):
        with pytest.raises(ValueError, match="utilization"):
            cost_per_1k_images(1.0, 1.0, utilization)


def test_per_gpu_share_and_counts():
    assert TABLE.usd_per_hour(parse_nodes("p5.48xlarge/gpu")) == pytest.approx(12.29)
    assert TABLE.usd_per_hour(parse_nodes("p5.48xlarge/gpu*2")) == pytest.approx(24.58)
    assert TABLE.usd_per_hour(parse_nodes("p5.48xlarge")) == pytest.approx(98.32)
    with pytest.raises(ValueError, match="no GPUs"):
        TABLE.usd_per_hour(parse_nodes("c7i.2xlarge/gpu"))
    with pytest.raises(ValueError, match="no price for instance 'g9'"):
        TABLE.usd_per_hour(parse_nodes("g9"))
    for bad in ("", "g5.xlarge*0", "g5.xlarge*two", "*2"):
        with pytest.raises(ValueError, match="NAME"):
            parse_nodes(bad)


def test_list_price_keeps_the_margin():
    assert list_price(0.1, 0.0) == pytest.approx(0.1)
    price = list_price(0.12, 0.4)
    assert price == pytest.approx(0.2) and (price - 0.12) / price == pytest.approx(0.4)
    with pytest.raises(ValueError, match="margin"):
        list_price(0.1, 1.0)


def test_the_shipped_price_table():
    table = load_prices(DEFAULT_PRICES)
    assert table.reference_usd_per_1k == 0.626
    names = set(table.instances)
    assert {"g5.xlarge", "g6.xlarge", "p4d.24xlarge", "p5.48xlarge"} <= names
    assert any(p.gpus == 0 for p in table.instances.values()), "a CPU instance"
    assert {p.provider for p in table.instances.values()} - {"aws"}, "a GPU cloud besides AWS"
    for price in table.instances.values():
        assert price.usd_per_hour > 0 and price.source.startswith("https://")
        assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", price.captured)
    assert table.price("p5.48xlarge").gpus == 8 and table.price("p4d.24xlarge").gpus == 8
    assert "list prices" in DEFAULT_PRICES.read_text().lower()


def test_a_price_table_with_unknown_fields_is_refused(tmp_path):
    path = tmp_path / "prices.yaml"
    path.write_text("reference: {usd_per_1k_images: 1}\ninstances:\n  - {name: a, usd_per_hour: 1, colour: red}\n")
    with pytest.raises(ValueError, match="takes only"):
        load_prices(path)
    path.write_text("instances: []\n")
    with pytest.raises(ValueError, match="reference"):
        load_prices(path)


POINTS = [
    {"label": "concurrency=1", "images_per_s": 4.0, "latency_p99_s": 0.4, "error_rate": 0.0},
    {"label": "concurrency=16", "images_per_s": 40.0, "latency_p99_s": 1.5, "error_rate": 0.005},
    {"label": "concurrency=64", "images_per_s": 45.0, "latency_p99_s": 5.0, "error_rate": 0.05},
]


def test_the_priced_point_is_the_fastest_admissible_one():
    assert best_point(POINTS)["label"] == "concurrency=16"
    assert best_point(POINTS, max_error_rate=0.1)["label"] == "concurrency=64"
    assert best_point(POINTS, slo_p99_s=1.0)["label"] == "concurrency=1"
    assert best_point(POINTS, slo_p99_s=0.1) is None


def test_price_row():
    summary = {"kind": "service", "nodes": ["g5.xlarge"], "hardware": {"gpus": ["NVIDIA A10G"]}, "points": POINTS}
    row = price_row("a10", summary, TABLE, utilization=0.5, margin=0.3)
    assert (row.point, row.bench_host, row.usd_per_hour, row.images_per_s) == (
        "concurrency=16",
        "NVIDIA A10G",
        1.006,
        40,
    )
    assert row.cost_per_1k_images_usd == pytest.approx(1.006 / 144)
    assert row.cost_per_1k_images_usd_at_utilization == pytest.approx(1.006 / 72)
    assert row.list_price_per_1k_images_usd == pytest.approx(1.006 / 72 / 0.7)
    assert row.list_price_vs_reference == pytest.approx(1.006 / 72 / 0.7 / 0.626)
    other = price_row("p5", summary, TABLE, nodes="p5.48xlarge/gpu", utilization=1.0, margin=0.0, slo_p99_s=1.0)
    assert other.nodes == "p5.48xlarge/gpu" and other.images_per_s == 4.0
    assert other.list_price_per_1k_images_usd == pytest.approx(12.29 / 14.4)
    none = price_row("x", summary, TABLE, utilization=0.5, margin=0.3, slo_p99_s=0.01)
    assert none.point == "none admissible" and none.cost_per_1k_images_usd is None
    with pytest.raises(ValueError, match="--nodes"):
        price_row("bare", {**summary, "nodes": []}, TABLE, utilization=0.5, margin=0.3)

"""The cost formula, node specs, the shipped price table and the pricing estimate, against hand-computed values."""

from __future__ import annotations

import re

import pytest

from bench.cost import (
    DEFAULT_PRICES,
    InstancePrice,
    PriceTable,
    break_even_usd_per_hour,
    cost_per_1k_images,
    list_price,
    load_prices,
    parse_nodes,
)
from bench.pricing import (
    BATCH,
    ENGINE_LOOP,
    ENGINE_STATIC,
    SERVICE,
    Offer,
    best_point,
    figures_of,
    offers_for,
    price_row,
)
from bench.task_cost import DEFAULT_TASK_LENGTHS, load_task_lengths, task_price

TABLE = PriceTable(
    {
        "g5.xlarge": InstancePrice("g5.xlarge", 1.006, gpus=1, accelerator="A10G"),
        "m7g.large": InstancePrice("m7g.large", 0.0816, vcpus=2),
        "p5.48xlarge": InstancePrice("p5.48xlarge", 55.04, gpus=8, vcpus=192, accelerator="H100"),
        "h200-box": InstancePrice("h200-box", gpus=8, usd_per_gpu_hour=6.0, accelerator="H200", vcpus=32),
    },
    reference_usd_per_1k=0.626,
)


def test_cost_per_1k_images():
    # $1.006/h at 10 images/s: 36,000 images an hour, so $1.006 / 36 per 1,000 images.
    assert cost_per_1k_images(1.006, 10.0) == pytest.approx(1.006 / 36)
    assert cost_per_1k_images(1.006, 10.0, utilization=0.25) == pytest.approx(4 * 1.006 / 36)
    # A GPU node plus two CPU nodes at 50 images/s.
    usd = TABLE.usd_per_hour(parse_nodes("g5.xlarge,m7g.large*2"))
    assert usd == pytest.approx(1.1692)
    assert cost_per_1k_images(usd, 50.0) == pytest.approx(1.1692 / 180)
    assert cost_per_1k_images(usd, 0.0) is None
    for utilization in (0.0, 1.5):
        with pytest.raises(ValueError, match="utilization"):
            cost_per_1k_images(1.0, 1.0, utilization)


def test_break_even_is_the_price_that_costs_the_reference():
    for images_per_s, utilization in ((764.5, 1.0), (10.0, 0.3)):
        usd = break_even_usd_per_hour(0.626, images_per_s, utilization)
        assert cost_per_1k_images(usd, images_per_s, utilization) == pytest.approx(0.626)


def test_per_gpu_shares_published_or_derived():
    assert TABLE.usd_per_hour(parse_nodes("p5.48xlarge/gpu")) == pytest.approx(6.88)
    assert TABLE.usd_per_hour(parse_nodes("p5.48xlarge/gpu*2")) == pytest.approx(13.76)
    assert TABLE.usd_per_hour(parse_nodes("p5.48xlarge")) == pytest.approx(55.04)
    p5, box = TABLE.price("p5.48xlarge"), TABLE.price("h200-box")
    assert p5.gpu_price_derived and not p5.instance_price_derived
    assert box.instance_usd_per_hour == 48.0 and box.instance_price_derived and not box.gpu_price_derived
    assert not TABLE.price("g5.xlarge").gpu_price_derived  # one GPU: its share is the instance
    with pytest.raises(ValueError, match="no GPUs"):
        TABLE.usd_per_hour(parse_nodes("m7g.large/gpu"))
    with pytest.raises(ValueError, match="no price for instance 'g9'"):
        TABLE.usd_per_hour(parse_nodes("g9"))
    for bad in ("", "g5.xlarge*0", "g5.xlarge*two", "*2"):
        with pytest.raises(ValueError, match="NAME"):
            parse_nodes(bad)
    with pytest.raises(ValueError, match="one of them"):
        InstancePrice("both", 1.0, gpus=1, usd_per_gpu_hour=1.0)


def test_list_price_keeps_the_margin():
    assert list_price(0.1, 0.0) == pytest.approx(0.1)
    price = list_price(0.12, 0.4)
    assert price == pytest.approx(0.2) and (price - 0.12) / price == pytest.approx(0.4)
    with pytest.raises(ValueError, match="margin"):
        list_price(0.1, 1.0)


def test_the_shipped_price_table_dates_and_sources_every_row():
    table = load_prices(DEFAULT_PRICES)
    reference = table.reference
    assert table.reference_usd_per_1k == reference.usd_per_1k_images == 0.626
    assert reference.date == "2026-11" and "set at launch" in reference.basis and reference.source
    for price in table.instances.values():
        assert price.instance_usd_per_hour > 0 and price.provider and price.region
        assert re.fullmatch(r"\d{4}-\d{2}(-\d{2})?", price.date) and price.date_kind in ("published", "read")
        assert price.source.startswith("https://")
    h200 = [p for p in table.gpu_rows() if p.accelerator == "H200"]
    assert len({p.provider for p in h200 if p.pricing == "on-demand"}) >= 3
    for gpu in ("H100", "A100", "L40S", "L4", "A10G"):
        assert any(p.accelerator == gpu for p in table.gpu_rows()), gpu
    assert any(p.gpus == 0 and p.vcpus for p in table.instances.values()), "a CPU instance"
    assert table.price("p5en.48xlarge").gpu_usd_per_hour == pytest.approx(63.296 / 8)


def test_a_price_row_without_date_or_source_is_refused(tmp_path):
    path = tmp_path / "prices.yaml"
    row = "{name: a, provider: x, pricing: on-demand, region: r, date: 2026-01-02, source: s, usd_per_hour: 1"
    path.write_text(f"reference: {{usd_per_1k_images: 1}}\ninstances:\n  - {row}, colour: red}}\n")
    with pytest.raises(ValueError, match="takes only"):
        load_prices(path)
    path.write_text(f"reference: {{usd_per_1k_images: 1}}\ninstances:\n  - {row.replace(', source: s', '')}}}\n")
    with pytest.raises(ValueError, match="needs name, provider, pricing, region, date, source"):
        load_prices(path)
    path.write_text(f"reference: {{usd_per_1k_images: 1}}\ninstances:\n  - {row.replace('2026-01-02', 'May')}}}\n")
    with pytest.raises(ValueError, match="YYYY-MM"):
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


SERVICE_SUMMARY = {
    "kind": "service",
    "config": {"workload": {"max_tokens": 32, "ignore_eos": True}},
    "hardware": {"gpus": ["NVIDIA H200"]},
    "points": POINTS,
}
ENGINE_SUMMARY = {
    "kind": "engine",
    "gpu": "NVIDIA H200",
    "config": {"output_lengths": [16, 64], "workload": {"max_tokens": 32}},
    "points": [
        {"path": "fast", "batch_size": 8, "max_tokens": 16, "images_per_s": 90.0, "completion_tokens_mean": 16},
        {"path": "fast", "batch_size": 64, "max_tokens": 16, "images_per_s": 120.0, "completion_tokens_mean": 16},
        {"path": "fast", "batch_size": 64, "max_tokens": 64, "images_per_s": 50.0, "completion_tokens_mean": 64},
    ],
    "continuous": [
        {"path": "fast", "concurrency": 64, "max_tokens": 16, "images_per_s": 100.0, "tokens_per_s": 1600.0},
        {"path": "fast", "concurrency": 64, "max_tokens": 64, "images_per_s": 40.0, "tokens_per_s": 2560.0},
    ],
}


def test_figures_say_what_they_measured():
    [service] = figures_of("svc", SERVICE_SUMMARY, cpu_ms_per_request=12.0)
    assert (service.kind, service.point, service.gpu, service.new_tokens) == (
        SERVICE,
        "concurrency=16",
        "NVIDIA H200",
        32,
    )
    assert service.images_per_s == 40.0 and service.cpu_ms_per_request == 12.0
    engine = figures_of("eng", ENGINE_SUMMARY)
    assert [(f.kind, f.new_tokens, f.images_per_s, f.point) for f in engine] == [
        (ENGINE_STATIC, 16, 120.0, "fast batch 64"),
        (ENGINE_STATIC, 64, 50.0, "fast batch 64"),
        (ENGINE_LOOP, 16, 100.0, "fast 64 in flight"),
        (ENGINE_LOOP, 64, 40.0, "fast 64 in flight"),
    ]
    assert engine[3].tokens_per_request == 64 and all(f.cpu_ms_per_request is None for f in engine)
    variable = {**SERVICE_SUMMARY, "config": {"workload": {"max_tokens": 64}}}
    assert figures_of("v", variable)[0].new_tokens is None  # answers ended at their end token
    assert figures_of("none", SERVICE_SUMMARY, slo_p99_s=0.1) == []


def test_a_figure_is_priced_on_every_instance_of_its_gpu_and_only_those():
    assert [o.name for o in offers_for("NVIDIA H200", TABLE)] == ["h200-box"]
    assert [o.name for o in offers_for("NVIDIA H100 80GB HBM3", TABLE)] == ["p5.48xlarge"]
    assert offers_for("NVIDIA L40S", TABLE) == [] and offers_for("cpu", TABLE) == []
    shipped = offers_for("NVIDIA H200", load_prices())
    assert {o.provider for o in shipped} >= {"aws", "gcp", "coreweave"}
    assert [o.pricing for o in shipped] == sorted((o.pricing for o in shipped), key=lambda p: p != "on-demand")


def test_a_service_row_adds_the_cpu_cores_its_instance_lacks():
    figure = figures_of("svc", SERVICE_SUMMARY, cpu_ms_per_request=1000.0)[0]  # 40 cores at 40 images/s
    per_vcpu = 0.0816 / 2
    box = price_row(figure, Offer.of(TABLE.price("h200-box")), (0.5, 1.0), 0.3, 0.626, per_vcpu)
    assert box.cpu_cores_needed == pytest.approx(40.0)
    assert box.cpu_usd_per_hour == pytest.approx((40 - 4) * per_vcpu)  # 4 vCPUs a GPU of the 32 of 8 GPUs
    assert box.usd_per_hour == pytest.approx(6.0 + 36 * per_vcpu)
    assert box.cost_usd[1.0] == pytest.approx(box.usd_per_hour / (40 * 3.6))
    assert box.cost_usd[0.5] == pytest.approx(2 * box.cost_usd[1.0])
    assert box.list_price_usd[0.5] == pytest.approx(box.cost_usd[0.5] / 0.7)
    assert box.vs_reference[1.0] == pytest.approx(box.cost_usd[1.0] / 0.626)
    assert box.break_even_usd_per_gpu_hour[1.0] == pytest.approx(0.626 * 40 * 3.6 - 36 * per_vcpu)
    roomy = price_row(
        figures_of("s", SERVICE_SUMMARY, cpu_ms_per_request=50.0)[0],
        Offer.of(TABLE.price("p5.48xlarge")),
        (1.0,),
        0.3,
        0.626,
        per_vcpu,
    )
    assert roomy.cpu_cores_needed == pytest.approx(2.0) and roomy.cpu_usd_per_hour == 0  # 24 vCPUs a GPU
    engine = price_row(
        figures_of("e", ENGINE_SUMMARY)[0], Offer.of(TABLE.price("h200-box")), (1.0,), 0.3, 0.626, per_vcpu
    )
    assert engine.cpu_usd_per_hour == 0 and engine.cpu_cores_needed is None  # the engine alone has no CPU tier
    record = box.to_dict()
    assert record["cost_per_1k_usd_at_50pct"] == box.cost_usd[0.5] and record["figure_kind"] == SERVICE
    assert record["offer_name"] == "h200-box" and record["offer_derived"] is False


BATCH_SUMMARY = {
    "kind": "batch",
    "hardware": {"gpus": ["NVIDIA H200"]},
    "config": {"job": {"source": "requests.jsonl"}, "service": {}},
    "points": [{"label": "batch", "images_per_s": 80.0, "error_rate": 0.005, "cpu_ms_per_request": 25.0}],
}


def test_a_batch_run_is_priced_with_the_cpu_its_own_processes_spent():
    [figure] = figures_of("b", BATCH_SUMMARY, slo_p99_s=0.1)  # a batch has no latency goal
    assert (figure.kind, figure.images_per_s, figure.cpu_ms_per_request, figure.new_tokens) == (BATCH, 80.0, 25.0, None)
    assert figures_of("b", BATCH_SUMMARY, cpu_ms_per_request=50.0)[0].cpu_ms_per_request == 25.0  # its own
    row = price_row(figure, Offer.of(TABLE.price("h200-box")), (1.0,), 0.3, 0.626, 0.0408)
    assert row.cpu_cores_needed == pytest.approx(2.0)  # 25 ms x 80 images/s, within the box's 4 vCPUs a GPU
    assert row.cpu_usd_per_hour == 0 and row.cost_usd[1.0] == pytest.approx(6.0 / (80 * 3.6))
    failing = {**BATCH_SUMMARY, "points": [{**BATCH_SUMMARY["points"][0], "error_rate": 0.5}]}
    assert figures_of("f", failing) == []  # half its rows failed: no price


def test_a_node_set_is_priced_as_given():
    figure = figures_of("svc", SERVICE_SUMMARY, cpu_ms_per_request=1000.0)[0]
    offer = Offer.node_set("p5.48xlarge/gpu,m7g.large*4", TABLE)
    row = price_row(figure, offer, (1.0,), 0.0, 0.626, 0.0408)
    assert offer.usd_per_hour == pytest.approx(6.88 + 4 * 0.0816) and offer.derived
    assert row.usd_per_hour == offer.usd_per_hour and row.cpu_usd_per_hour == 0


def test_task_prices_bound_unmeasured_lengths_from_above_and_never_extrapolate():
    costs = {16: 0.1, 64: 0.4}
    exact = task_price({16: 0.5, 64: 0.5}, costs)
    assert exact.usd == pytest.approx(0.25) and exact.exact and exact.note == ""
    bounded = task_price({8: 0.5, 32: 0.5}, costs)  # 8 at 16, 32 at 64: an upper bound
    assert bounded.usd == pytest.approx(0.25) and not bounded.exact
    assert bounded.note == "8 tokens priced at 16 (an upper bound); 32 tokens priced at 64 (an upper bound)"
    beyond = task_price({16: 0.9, 128: 0.1}, costs)
    assert beyond.usd is None and "no measurement at 128 new tokens or more (the longest measured is 64)" in beyond.note
    assert task_price({16: 1.0}, {}).usd is None


def test_the_shipped_task_lengths(tmp_path):
    lengths = load_task_lengths(DEFAULT_TASK_LENGTHS)
    assert set(lengths) == {"caption", "detailed_caption", "vqa", "ground", "describe_region"}
    for shares in lengths.values():
        assert sum(shares.values()) == pytest.approx(1.0) and list(shares) == sorted(shares)
    assert max(lengths["detailed_caption"]) > max(lengths["caption"])
    path = tmp_path / "lengths.yaml"
    path.write_text("tasks:\n  poetry: {16: 1}\n")
    with pytest.raises(ValueError, match="unknown task 'poetry'"):
        load_task_lengths(path)
    path.write_text("tasks:\n  caption: {16: 3, 32: 1}\n")
    assert load_task_lengths(path) == {"caption": {16: 0.75, 32: 0.25}}

"""The pricing estimate's report (``python -m bench price``): ``report.md``, ``pricing.csv`` (one row per figure
and offer), ``tasks.csv`` (one row per task, figure kind, offer and utilization), ``pricing.png`` and
``break_even.png``, from the price rows of ``bench.pricing`` and the price table they came from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench import plots
from bench.cost import PriceTable
from bench.pricing import BATCH, KINDS, SERVICE, WITH_CPU_TIER, Figure, PriceRow
from bench.tables import markdown_table
from bench.task_cost import TASK_NAMES, task_price


@dataclass(frozen=True)
class PriceSettings:
    """How the rows were priced, for the report's text."""

    utilizations: tuple[float, ...]
    margin: float
    slo_p99_s: float | None
    max_error_rate: float
    cpu_instance: str | None
    prices_path: str
    lengths_path: str


def _pct(u: float) -> str:
    return f"{u:.0%}"


def _share(value: float | None) -> str:
    return "–" if value is None else f"{value:.2%}"


def _money(value: float | None, derived: bool = False) -> str:
    return "–" if value is None else f"${value:.4g}" + ("*" if derived else "")


def figure_title(figure: Figure) -> str:
    tokens = f"{figure.new_tokens} new tokens" if figure.new_tokens else "answers to their end token"
    return f"{figure.kind}: {figure.run}, {figure.point}, {figure.images_per_s:.4g} images/s on {figure.gpu}, {tokens}"


def write_price_report(
    rows: Sequence[PriceRow],
    figures: Sequence[Figure],
    table: PriceTable,
    task_lengths: dict[str, dict[int, float]],
    settings: PriceSettings,
    out_dir: Path,
) -> Path:
    """Every file of the pricing estimate in ``out_dir``; returns the path of ``report.md``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame([row.to_dict() for row in rows]).to_csv(out_dir / "pricing.csv", index=False)
    tasks = task_rows(rows, task_lengths, settings.utilizations)
    pd.DataFrame(tasks).to_csv(out_dir / "tasks.csv", index=False)
    reference = table.reference
    middle = settings.utilizations[(len(settings.utilizations) - 1) // 2]
    panels = {
        figure_title(f): {f"{r.offer.name} ({r.offer.pricing})": r.cost_usd for r in rows if r.figure is f}
        for f in figures
        if f.new_tokens in (None, *_common_lengths(figures))
    }
    plots.offer_bars_plot(panels, table.reference_usd_per_1k, out_dir / "pricing.png")
    lines = {
        f"{f.kind}, {f.new_tokens or 'variable'} tokens, {_pct(u)}": f.images_per_s / f.gpus * u
        for f in _best_per_kind(figures)
        for u in (min(settings.utilizations), max(settings.utilizations))
    }
    offers = {r.offer.name: r.offer.usd_per_hour for r in rows if r.offer.cpu_tier}
    plots.break_even_plot(lines, offers, table.reference_usd_per_1k, out_dir / "break_even.png")
    lines_md = [
        "# Kosmos-2 pricing estimate",
        "",
        f"**Reference:** ${table.reference_usd_per_1k:.3f} per 1,000 images ({reference.name}: {reference.basis}; "
        f"{reference.date}; source: {reference.source}).",
        "",
        f"Cost per 1,000 images = $/h ÷ (images/s × 3600) × 1000 ÷ utilization, where utilization is the share "
        f"of paid hours that carry load at the measured throughput ({', '.join(map(_pct, settings.utilizations))} "
        f"below). Prices: `{settings.prices_path}`, each with its date and source in *Prices used*; `*` marks a "
        "per-GPU price derived from an instance's price (÷ its GPUs). List price = cost ÷ "
        f"(1 − {settings.margin:.0%} margin), in `pricing.csv`. The break-even is the hourly price a GPU at "
        "the measured throughput may cost to match the reference.",
        "",
        *_measured_section(figures, settings),
        *[line for kind in KINDS for line in _cost_section(rows, kind, settings, middle)],
        *[line for kind in WITH_CPU_TIER for line in _cpu_section(rows, kind, settings)],
        *_task_section(tasks, task_lengths, settings, middle),
        *_break_even_section(rows, table, settings),
        *_prices_section(table),
        "## Runs",
        "",
        *dict.fromkeys(f"- {f.run}: started {f.started_at or '–'}, commit `{f.commit or 'unknown'}`" for f in figures),
        "",
    ]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines_md))
    return path


def _common_lengths(figures: Sequence[Figure]) -> set[int]:
    """The output lengths every kind of figure was measured at (the bars compare like with like)."""
    kinds = {f.kind for f in figures if f.new_tokens}
    sets = [{f.new_tokens for f in figures if f.kind == k and f.new_tokens} for k in kinds]
    return set.intersection(*sets) if sets else set()


def _best_per_kind(figures: Sequence[Figure]) -> list[Figure]:
    """Each kind's fastest figure at the lengths every kind has."""
    common = _common_lengths(figures)
    best: dict[str, Figure] = {}
    for f in figures:
        faster = f.kind not in best or f.images_per_s > best[f.kind].images_per_s
        if (f.new_tokens in common or not common) and faster:
            best[f.kind] = f
    return list(best.values())


def _measured_section(figures: Sequence[Figure], settings: PriceSettings) -> list[str]:
    frame = pd.DataFrame(
        [
            {
                "run": f.run,
                "what": f.kind,
                "point": f.point,
                "measured on": f.gpu,
                "new tokens": f.new_tokens
                or (f"variable (mean {f.tokens_per_request:.3g})" if f.tokens_per_request else "variable"),
                "images/s": f.images_per_s,
                "p99 (s)": f.latency_p99_s,
                "CPU ms/request": f.cpu_ms_per_request,
            }
            for f in figures
        ]
    )
    lengths = sorted({f.new_tokens for f in figures if f.new_tokens})
    admissible = f"error rate at most {settings.max_error_rate:.1%}" + (
        f", p99 within {settings.slo_p99_s:g} s" if settings.slo_p99_s is not None else ""
    )
    batch = (
        "; a batch figure is its run's answers over the span from the engines taking the first request to giving "
        "the last answer"
        if any(f.kind == BATCH for f in figures)
        else ""
    )
    return [
        "## What was measured",
        "",
        f"Output lengths measured: {', '.join(map(str, lengths)) or 'none fixed'} new tokens; no other length is "
        "priced from these runs (see *By task*). The service figure is its fastest point with an "
        f"{admissible}{batch}. Engine-only figures (static batches, closed loops at the engine) leave out "
        "HTTP, Ray, image decoding and the CPU tier: they bound what a service on that GPU could reach and are "
        "priced apart, never as the service.",
        "",
        markdown_table(frame),
        "",
    ]


def _cost_section(rows: Sequence[PriceRow], kind: str, settings: PriceSettings, middle: float) -> list[str]:
    mine = [r for r in rows if r.figure.kind == kind]
    if not mine:
        return []
    lines = [f"## {kind.capitalize()}: cost per 1,000 images", ""]
    if kind == BATCH:
        lines += [
            "The batch mode (`python -m serve batch`): the engine fed by Ray Data, no HTTP; with its CPU tier.",
            "",
        ]
    elif kind != SERVICE:
        lines += ["Engine alone, not the service: no CPU tier, no HTTP or Ray; an upper bound on throughput.", ""]
    for figure in dict.fromkeys(r.figure for r in mine):
        frame = pd.DataFrame(
            [
                {
                    "provider": r.offer.provider,
                    "instance": r.offer.instance,
                    "pricing": r.offer.pricing,
                    "region": r.offer.region,
                    "$/GPU-h": _money(r.offer.usd_per_hour, r.offer.derived),
                    **({"CPU tier $/h": _money(r.cpu_usd_per_hour)} if kind in WITH_CPU_TIER else {}),
                    **{f"$/1k @{_pct(u)}": r.cost_usd[u] for u in settings.utilizations},
                    f"of the reference @{_pct(middle)}": _share(r.vs_reference[middle]),
                    f"break-even $/GPU-h @{_pct(middle)}": r.break_even_usd_per_gpu_hour[middle],
                    "price date": r.offer.date,
                    "notes": "; ".join(r.notes) or "",
                }
                for r in mine
                if r.figure is figure
            ]
        )
        lines += [f"**{figure_title(figure)}**", "", markdown_table(frame), ""]
    return lines


def _cpu_section(rows: Sequence[PriceRow], kind: str, settings: PriceSettings) -> list[str]:
    mine = [r for r in rows if r.figure.kind == kind and r.offer.cpu_tier]
    if not mine:
        return []
    figure = mine[0].figure
    title = f"## The CPU tier of the {kind}"
    if figure.cpu_ms_per_request is None:
        return [title, "", f"No CPU a request was measured for the {kind} runs: not priced.", ""]
    processes = (
        "Ingress, Preprocessor, Generator, engine process, Ray; the load generator left out"
        if kind == SERVICE
        else "the driver and its Ray: reading, preparing, the engine actors and processes, finishing, writing"
    )
    frame = pd.DataFrame(
        [
            {
                "offer": f"{r.offer.name} ({r.offer.pricing})",
                "vCPUs a GPU": r.offer.vcpus_per_gpu,
                "cores needed a GPU": r.cpu_cores_needed,
                "extra CPU $/h": r.cpu_usd_per_hour,
            }
            for r in mine
        ]
    )
    return [
        title,
        "",
        f"The {kind} spent {figure.cpu_ms_per_request:.3g} CPU ms a request in its own processes ({processes}), so at "
        f"{figure.images_per_s:.4g} images/s a GPU needs {figure.cpu_ms_per_request * figure.images_per_s / 1000:.3g}"
        " cores beside it. An instance whose vCPUs a GPU cover them adds nothing; the cores short (all of them "
        f"where the vCPUs are not stated) are priced at `{settings.cpu_instance}`'s price a vCPU.",
        "",
        markdown_table(frame),
        "",
    ]


def task_rows(
    rows: Sequence[PriceRow], task_lengths: dict[str, dict[int, float]], utilizations: Sequence[float]
) -> list[dict]:
    """Per task, figure kind, offer and utilization: its price from the fixed-length figures of that kind."""
    out = []
    groups: dict[tuple[str, str], list[PriceRow]] = {}
    for r in rows:
        if r.figure.new_tokens:
            groups.setdefault((r.figure.kind, r.offer.name), []).append(r)
    for (kind, offer), mine in groups.items():
        for u in utilizations:
            by_length: dict[int, float] = {}
            for r in mine:
                cost = r.cost_usd[u]
                if cost is not None and cost < by_length.get(r.figure.new_tokens, float("inf")):
                    by_length[r.figure.new_tokens] = cost
            for task, shares in task_lengths.items():
                price = task_price(shares, by_length)
                out.append(
                    {
                        "task": task,
                        "kind": kind,
                        "offer": offer,
                        "pricing": mine[0].offer.pricing,
                        "utilization": u,
                        "cost_per_1k_usd": price.usd,
                        "every_length_measured": price.exact,
                        "note": price.note,
                    }
                )
    return out


def _task_section(
    tasks: list[dict], task_lengths: dict[str, dict[int, float]], settings: PriceSettings, middle: float
) -> list[str]:
    lengths = pd.DataFrame(
        [
            {"task": f"{t} ({TASK_NAMES[t]})", **{f"≤ {n} tokens": f"{s:.0%}" for n, s in shares.items()}}
            for t, shares in task_lengths.items()
        ]
    ).fillna("")
    lines = [
        "## By task",
        "",
        f"Answer lengths per task (`{settings.lengths_path}`: assumed shares, to be replaced by measured ones):",
        "",
        markdown_table(lengths),
        "",
        "A task's cost is its shares' weighted cost at their lengths; a share whose length was not measured is "
        "priced at the next longer length measured (`≤`: an upper bound), and a task with a share longer than "
        f"every measured length is not priced. At {_pct(middle)} utilization ({'`tasks.csv`'} has every "
        "utilization):",
        "",
    ]
    for kind in KINDS:
        mine = [t for t in tasks if t["kind"] == kind and t["utilization"] == middle]
        if not mine:
            continue
        frame = pd.DataFrame(
            [
                {"task": t, **{f"{r['offer']} ({r['pricing']})": _task_cell(r) for r in mine if r["task"] == t}}
                for t in task_lengths
            ]
        )
        notes = sorted({t["note"] for t in mine if t["note"]})
        lines += [f"**{kind}**", "", markdown_table(frame), "", *[f"- {task}: {note}" for task, note in _notes(mine)]]
        lines += [""] if notes else []
    return lines


def _task_cell(row: dict) -> str:
    if row["cost_per_1k_usd"] is None:
        return "not measured"
    return ("" if row["every_length_measured"] else "≤ ") + f"${row['cost_per_1k_usd']:.4g}"


def _notes(rows: list[dict]) -> list[tuple[str, str]]:
    """Each task's note once (the same for every offer of a kind)."""
    return list(dict.fromkeys((r["task"], r["note"]) for r in rows if r["note"]))


def _break_even_section(rows: Sequence[PriceRow], table: PriceTable, settings: PriceSettings) -> list[str]:
    reference = table.reference_usd_per_1k
    frame = pd.DataFrame(
        [
            {
                "GPU": p.accelerator,
                "instance": p.name,
                "pricing": p.pricing,
                "$/GPU-h": _money(p.gpu_usd_per_hour, p.gpu_price_derived),
                **{
                    f"images/s to match @{_pct(u)}": p.gpu_usd_per_hour / (reference * 3.6 * u)
                    for u in settings.utilizations
                },
            }
            for p in table.gpu_rows()
        ]
    )
    return [
        "## Break-even",
        "",
        "The hourly price at which a GPU matches the reference is the reference × images/s × 3.6 × utilization "
        "(less the CPU tier's extra): the break-even columns above, and the dots in `break_even.png`. For every GPU "
        "in the price table, measured here or not, the images/s one GPU must sustain at its price to match the "
        "reference (what a run on that GPU would have to show; nothing here estimates it):",
        "",
        markdown_table(frame),
        "",
        "![cost per 1,000 images by offer](pricing.png)",
        "",
        "![break-even hourly price](break_even.png)",
        "",
    ]


def _prices_section(table: PriceTable) -> list[str]:
    frame = pd.DataFrame(
        [
            {
                "name": p.name,
                "provider": p.provider,
                "GPU": p.gpu or "– (CPU)",
                "GPUs": p.gpus,
                "vCPUs": p.vcpus,
                "pricing": p.pricing,
                "$/h": _money(p.instance_usd_per_hour, p.instance_price_derived),
                "$/GPU-h": _money(p.gpu_usd_per_hour, p.gpu_price_derived) if p.gpus else "–",
                "region": p.region,
                "date": f"{p.date} ({p.date_kind})",
                "source": p.source,
            }
            for p in table.instances.values()
        ]
    )
    return [
        "## Prices used",
        "",
        "Every row of the price table (`*`: derived from the published figure, × or ÷ the GPUs). `published`: the "
        "date the source states for its prices; `read`: the day the source read them. Notes on each source are in "
        "the table file.",
        "",
        markdown_table(frame),
        "",
    ]

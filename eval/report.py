"""``report.md``: this run's accuracy laid out like the Kosmos-2 paper's table, beside published numbers.

``render_report(summary)`` turns the dictionary that ``eval.runner`` writes to ``summary.json`` into Markdown:
the paper's RefCOCO / RefCOCO+ / RefCOCOg table with Kosmos-2's and Florence-2-L's zero-shot accuracy and this
run's, then every split measured with its 95% interval, where each came from (layout, box format, partition)
and why a split is kept out of the paper's table, the precision, the decoding settings and the versions. A
split enters the paper's table only when it is the paper's split: RefCOCO and RefCOCO+ by ``unc``, RefCOCOg by
``umd``, and not a re-cut such as lmms-lab's RefCOCO ``val``. It runs as part of ``python -m eval run``.
"""

from __future__ import annotations

import json
from typing import Any

PAPER_COLUMNS = (
    ("refcoco", "val", "RefCOCO val"),
    ("refcoco", "testA", "RefCOCO testA"),
    ("refcoco", "testB", "RefCOCO testB"),
    ("refcoco+", "val", "RefCOCO+ val"),
    ("refcoco+", "testA", "RefCOCO+ testA"),
    ("refcoco+", "testB", "RefCOCO+ testB"),
    ("refcocog", "val", "RefCOCOg val"),
    ("refcocog", "test", "RefCOCOg test"),
)
"""The columns of the Kosmos-2 paper's referring-expression table: (dataset, split, heading)."""

KOSMOS2_PAPER = (52.32, 57.42, 47.26, 45.48, 50.73, 42.24, 60.57, 61.65)
"""Kosmos-2 zero-shot accuracy (%), in :data:`PAPER_COLUMNS` order: Peng et al. 2023, "Kosmos-2: Grounding
Multimodal Large Language Models to the World" (arXiv:2306.14824), as listed in unilm's
``kosmos-2/evaluation/refcoco/README.md``."""

FLORENCE2_L_ZERO_SHOT = (56.3, 61.6, 51.4, 53.6, 57.9, 49.9, 68.0, 67.0)
"""Florence-2-L zero-shot accuracy (%), in :data:`PAPER_COLUMNS` order: Xiao et al. 2023, "Florence-2: Advancing
a Unified Representation for a Variety of Vision Tasks" (arXiv:2311.06242), zero-shot table, as reproduced in
the ``microsoft/Florence-2-large`` model card (Benchmarks, "Florence-2 Zero-shot performance"); that table lists
Kosmos-2 as 52.3 / 57.4 / 47.3 / 45.5 / 50.7 / 42.2 / 60.6 / 61.7, the figures above rounded."""

SOURCES = (
    "Kosmos-2: Peng et al. 2023, arXiv:2306.14824; numbers from "
    "https://github.com/microsoft/unilm/blob/master/kosmos-2/evaluation/refcoco/README.md",
    "Florence-2-L: Xiao et al. 2023, arXiv:2311.06242, zero-shot table, as listed in the model card "
    "https://huggingface.co/microsoft/Florence-2-large (Benchmarks: Florence-2 Zero-shot performance)",
)


def render_report(summary: dict[str, Any]) -> str:
    """The Markdown report of one run's summary."""
    config = summary["config"]
    measured = {(s["dataset"], s["split"]): s for s in summary["per_split"] if s["paper_column"]}
    name = config.get("predictor", "?")
    lines = [
        f"# Referring-expression comprehension: `{name}`",
        "",
        f"Accuracy (IoU >= 0.5, first box of the phrase) **{_pct(summary['accuracy'])}** "
        f"(95% interval {_interval(summary['accuracy_ci95'])}) over {summary['n']} expressions; any-box upper "
        f"bound {_pct(summary['any_box_accuracy'])}; no box for {summary['no_box']}: {summary['phrase_mismatch']} "
        f"phrase mismatches (boxes only under other phrases) and {summary['no_object']} with no object at all; "
        f"{summary['errors']} errors.",
        "",
        f"Precision: {_precision(summary.get('dtype'), name)}. Boxes read as "
        f"{' and '.join(summary['bbox_formats']) or '?'} (see Data).",
    ]
    if not summary["complete"]:
        lines += [
            "",
            f"**Incomplete:** {summary['errors']} expressions failed and count as wrong; run the same command "
            "again to retry them.",
        ]
    lines += [
        "",
        "## Against the papers (zero-shot accuracy, %)",
        "",
        "| Model | " + " | ".join(heading for _, _, heading in PAPER_COLUMNS) + " |",
        "|---|" + "---:|" * len(PAPER_COLUMNS),
        "| Kosmos-2 (paper) | " + " | ".join(f"{v:.2f}" for v in KOSMOS2_PAPER) + " |",
        "| Florence-2-L (paper) | " + " | ".join(f"{v:.1f}" for v in FLORENCE2_L_ZERO_SHOT) + " |",
        f"| **this run** (`{name}`) | " + _row(measured, "accuracy") + " |",
        "| this run, 95% interval | " + _row(measured, "accuracy_ci95") + " |",
        "| this run, any box (upper bound) | " + _row(measured, "any_box_accuracy") + " |",
        "",
        "A dash: that split was not in this run, or what was measured under its name is not the paper's split "
        "(see Data). A paper's number inside this run's interval is no evidence of a difference. Sources:",
        "",
        *[f"- {source}" for source in SOURCES],
        "",
        "## Every split measured",
        "",
        "| Dataset | Split | n | Accuracy | 95% interval | Any box | No box | Phrase mismatch | No object | Errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *[
            f"| {s['dataset']} | {s['split'] or '–'} | {s['n']} | {_pct(s['accuracy'])} | "
            f"{_interval(s['accuracy_ci95'])} | {_pct(s['any_box_accuracy'])} | {s['no_box']} | "
            f"{s['phrase_mismatch']} | {s['no_object']} | {s['errors']} |"
            for s in summary["per_split"]
        ],
        "",
        "## Data",
        "",
        "| Dataset | Split | Partition | Read from | Box format | In the paper's table |",
        "|---|---|---|---|---|---|",
        *[
            f"| {s['dataset']} | {s['split'] or '–'} | {s['partition'] or '–'} | {', '.join(s['sources']) or '?'} | "
            f"{', '.join(s['bbox_formats']) or '?'} | {'yes' if s['paper_column'] else 'no: ' + _why_not(s)} |"
            for s in summary["per_split"]
        ],
        "",
        "The paper evaluated RefCOCO and RefCOCO+ on their `unc` partition and RefCOCOg on `umd` (MDETR's files); "
        "a refer-toolkit `refs(google).p` is reported as `refcoco-google` or `refcocog-google`.",
        "",
        "## Protocol",
        "",
        "unilm's `refexp_evaluate.py`: prompt `<grounding><phrase> {expression}</phrase>`, greedy, "
        "`no_repeat_ngram_size=3`; the answer decoded as the model wrote it (no clean-up of tokenization spaces); "
        "boxes of the entities whose phrase equals the expression; the first one, scaled by the annotation's width "
        "and height; IoU on continuous coordinates; correct at IoU >= 0.5; no box is wrong. The quirks reproduced "
        "are listed in `eval/refexp.py`, what still differs from the official run in `docs/evaluation.md`.",
        "",
        "## Run",
        "",
        "```json",
        json.dumps({"config": config, "versions": summary["versions"], "timing": summary.get("timing")}, indent=2),
        "```",
        "",
    ]
    return "\n".join(lines)


def _precision(dtype: str | None, predictor: str) -> str:
    """The model's dtype as the report states it."""
    if dtype:
        note = "as the official run" if dtype == "float32" else "the official run used float32"
        return f"{dtype} ({note})"
    if predictor == "api":
        return "as the service loads the model (the API does not report it; the official run used float32)"
    return "no model runs (a reference predictor)"


def _why_not(split: dict[str, Any]) -> str:
    if split["caveat"]:
        return split["caveat"]
    if split["partition"] and split["dataset"].endswith(f"-{split['partition']}"):
        return f"the {split['partition']} partition, not the paper's"
    return "not a column of the paper's table"


def _row(measured: dict[tuple[str, str], dict[str, Any]], key: str) -> str:
    cells = []
    for dataset, split, _ in PAPER_COLUMNS:
        value = measured[(dataset, split)][key] if (dataset, split) in measured else None
        if value is None:
            cells.append("–")
        elif isinstance(value, list):
            cells.append(f"{100 * value[0]:.1f}–{100 * value[1]:.1f}")
        else:
            cells.append(f"{100 * value:.2f}")
    return " | ".join(cells)


def _interval(bounds: list[float]) -> str:
    """A 95% interval as percentages.

    >>> _interval([0.4232, 0.6154])
    '42.32–61.54%'
    """
    return f"{100 * bounds[0]:.2f}–{100 * bounds[1]:.2f}%"


def _pct(value: float) -> str:
    """A fraction as a percentage.

    >>> _pct(0.52316)
    '52.32%'
    """
    return f"{100 * value:.2f}%"

"""The price per task: each task's answer lengths (``configs/task_lengths.yaml``) against the throughputs measured
at exact output lengths.

A task's lengths are shares of its answers by the most new tokens they take (``{16: 0.3, 32: 0.7}``: 30% end
within 16 tokens, 70% within 32). An image's GPU time adds up over a mix, so a task's cost per image is the
shares' weighted sum of the cost per image at each share's length. Each share is priced at a measured length:
its own bound where that length was measured, else the next longer one measured, which bounds its cost from
above (an answer never costs more than a longer one) and is labelled so; a share longer than every measured
length leaves the task unpriced rather than extrapolated.

    >>> price = task_price({16: 0.5, 32: 0.5}, {32: 0.2, 64: 0.3})
    >>> round(price.usd, 6), price.exact, price.note
    (0.2, False, '16 tokens priced at 32 (an upper bound)')
    >>> task_price({64: 1.0}, {32: 0.2}).usd is None
    True
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from serve.app.shipped import config_path

DEFAULT_TASK_LENGTHS = config_path("task_lengths.yaml")
"""The answer lengths shipped with the project (``configs/task_lengths.yaml``)."""

TASK_NAMES = {
    "caption": "brief grounded caption",
    "detailed_caption": "detailed caption",
    "vqa": "visual question answering",
    "ground": "grounding (expression to box)",
    "describe_region": "region description",
}
"""The tasks of the service's API, by the name requests give them."""


def load_task_lengths(path: str | Path = DEFAULT_TASK_LENGTHS) -> dict[str, dict[int, float]]:
    """Each task's shares of answers by their most new tokens, normalized to sum to 1."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    tasks: dict[str, dict[int, float]] = {}
    for task, shares in (data.get("tasks") or {}).items():
        if task not in TASK_NAMES:
            raise ValueError(f"{path}: unknown task {task!r}; the tasks are {', '.join(TASK_NAMES)}")
        if not isinstance(shares, dict) or not shares or min(shares.values()) < 0 or not sum(shares.values()):
            raise ValueError(f"{path}: {task} needs shares of answers by length, e.g. {{16: 0.4, 32: 0.6}}")
        if min(int(n) for n in shares) < 1:
            raise ValueError(f"{path}: {task}: lengths are numbers of new tokens, at least 1")
        total = sum(shares.values())
        tasks[task] = {int(n): share / total for n, share in sorted(shares.items(), key=lambda kv: int(kv[0]))}
    if not tasks:
        raise ValueError(f"{path}: no tasks")
    return tasks


@dataclass(frozen=True)
class TaskPrice:
    """A task's cost per 1,000 images (None if a share is longer than every measured length), whether every
    share was priced at its own length, and which were not."""

    usd: float | None
    exact: bool
    note: str


def task_price(shares: Mapping[int, float], cost_by_length: Mapping[int, float]) -> TaskPrice:
    """The shares' weighted cost, each share at its own length or the next longer one measured."""
    measured = sorted(cost_by_length)
    total, notes = 0.0, []
    for bound, share in shares.items():
        longer = [n for n in measured if n >= bound]
        if not longer:
            longest = f"the longest measured is {measured[-1]}" if measured else "none was measured"
            return TaskPrice(None, False, f"not priced: no measurement at {bound} new tokens or more ({longest})")
        if longer[0] != bound:
            notes.append(f"{bound} tokens priced at {longer[0]} (an upper bound)")
        total += share * cost_by_length[longer[0]]
    return TaskPrice(total, not notes, "; ".join(notes))

"""The per-request record of a load run, and reading and writing result files (JSON, JSON lines).

One :class:`RequestRecord` per request sent is written to ``requests.jsonl``; every metric is computed from
these records alone (``bench.metrics``), so a run can be re-reported from its files
(``python -m bench report DIR``). Times are seconds from the start of the run (``time.perf_counter``).

    >>> record = RequestRecord(point=0, index=3, item=3, task="caption", image_width=640, image_height=480,
    ...                        image_bytes=51234, warmup=False, scheduled_s=1.0, start_s=1.0, end_s=1.5,
    ...                        status=200, completion_tokens=12)
    >>> record.ok, record.latency_s
    (True, 0.5)
    >>> RequestRecord.from_json(record.to_json()) == record
    True
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TIMEOUT = "timeout"
"""``error_type`` of a request that ran out of time: our client's deadline, or the server's 504 envelope."""

CANCELLED = "cancelled"
"""``error_type`` of a request still in flight when the drain's grace period ended."""


@dataclass
class RequestRecord:
    """What happened to one request: when it was due and sent, when its first token and its end came, its
    image, its token counts (the server's ``usage``) and its HTTP status (0 when no answer came)."""

    point: int
    index: int
    item: int
    task: str
    image_width: int
    image_height: int
    image_bytes: int
    warmup: bool
    scheduled_s: float
    start_s: float
    end_s: float
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_s: float | None = None
    chunk_times_s: list[float] = field(default_factory=list)
    error_type: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error_type is None

    @property
    def latency_s(self) -> float:
        return self.end_s - self.start_s

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, line: str) -> RequestRecord:
        return cls(**json.loads(line))


def write_jsonl(path: Path, rows: Iterable[Any]) -> None:
    """One JSON object a line: dataclasses with ``to_json`` or plain dataclasses."""
    with Path(path).open("w") as out:
        for row in rows:
            out.write((row.to_json() if hasattr(row, "to_json") else json.dumps(dataclasses.asdict(row))) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The objects of a JSON lines file; an absent file reads as none."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_requests(path: Path) -> list[RequestRecord]:
    return [RequestRecord(**row) for row in read_jsonl(path)]


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Pretty JSON with non-finite numbers written as null (JSON has no infinity).

    >>> import tempfile; p = Path(tempfile.mkdtemp()) / "x.json"
    >>> write_json(p, {"a": float("inf"), "b": [1.5, float("nan")]}); p.read_text().split()
    ['{', '"a":', 'null,', '"b":', '[', '1.5,', 'null', ']', '}']
    """
    Path(path).write_text(json.dumps(_finite(data), indent=2) + "\n")


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value

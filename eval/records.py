"""The stored predictions: one :class:`PredictionRecord` a line of ``predictions.jsonl``, scored on reading, so
that an interrupted run resumes from what it has (``read_records``)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eval.datasets import RefExample
from eval.predictors import Prediction
from eval.refexp import PredictedEntity, Score, score
from serve.kosmos2.grounding import Box

SCHEMA_VERSION = 2
"""Version of the layout of ``predictions.jsonl`` and ``summary.json`` (2: entities keep their span and pixel
boxes, and ``no_object`` is counted beside ``phrase_mismatch``)."""


class RunError(RuntimeError):
    """The output folder holds something this run cannot continue from."""


@dataclass
class PredictionRecord:
    """One line of ``predictions.jsonl``: the expression, the answer, and its score.

    ``text`` is the answer's clean text and ``entities`` the entities as the predictor returned them (for the
    service: ``content`` and ``entities`` of its message), so a "no box" can be told apart afterwards: a
    ``phrase_mismatch`` has boxes under other phrases, a ``no_object`` none at all.
    """

    id: str
    dataset: str
    split: str
    expression: str
    image: str
    image_id: str
    width: int
    height: int
    gt_box: Box
    predictor: str
    text: str
    entities: list[PredictedEntity]
    finish_reason: str | None
    error: str | None
    pred_boxes: list[Box] = field(default_factory=list)
    """Boxes (pixels, xyxy) of the entities whose phrase is the expression; the first is scored."""
    iou: float = 0.0
    correct: bool = False
    any_box_iou: float = 0.0
    any_box_correct: bool = False
    no_box: bool = True
    phrase_mismatch: bool = False
    no_object: bool = True

    @classmethod
    def build(cls, example: RefExample, prediction: Prediction, predictor: str) -> PredictionRecord:
        record = cls(
            id=example.id,
            dataset=example.dataset,
            split=example.split,
            expression=example.expression,
            image=example.image_path,
            image_id=example.image_id,
            width=example.width,
            height=example.height,
            gt_box=example.box,
            predictor=predictor,
            text=prediction.text,
            entities=prediction.entities,
            finish_reason=prediction.finish_reason,
            error=prediction.error,
        )
        record.apply(record.score())
        return record

    def score(self) -> Score:
        return score(self.expression, self.gt_box, self.entities, self.width, self.height)

    def apply(self, s: Score) -> None:
        self.pred_boxes, self.iou, self.correct = s.boxes_px, s.iou, s.correct
        self.any_box_iou, self.any_box_correct = s.any_box_iou, s.any_box_correct
        self.no_box, self.phrase_mismatch, self.no_object = s.no_box, s.phrase_mismatch, s.no_object

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> PredictionRecord:
        """A stored line, scored again from its entities (so a line of an older layout gains the new fields)."""
        data = json.loads(line)
        data["entities"] = [PredictedEntity.from_json(e) for e in data["entities"]]
        data["gt_box"] = tuple(data["gt_box"])
        record = cls(**data)
        record.apply(record.score())
        return record


def read_records(path: Path, predictor: str, ids: set[str]) -> dict[str, PredictionRecord]:
    """The finished records of an earlier run for ``ids`` (last line per id wins).

    The file is rewritten without the lines that do not parse (a crash mid-write) or hold an error, so those
    are predicted again; lines of expressions outside this run are kept, unscored. A record of another
    predictor stops the run, since mixing two predictors' answers would score neither.
    """
    if not path.exists():
        return {}
    records: dict[str, PredictionRecord] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = PredictionRecord.from_json(line)
        except (ValueError, KeyError, TypeError):
            continue
        if record.predictor != predictor:
            raise RunError(
                f"{path} holds predictions of the {record.predictor!r} predictor, not {predictor!r}; "
                "choose another --out"
            )
        records[record.id] = record
    kept = {k: r for k, r in records.items() if r.error is None}
    temporary = path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(r.to_json() + "\n" for r in kept.values()), encoding="utf-8")
    os.replace(temporary, path)
    return {k: r for k, r in kept.items() if k in ids}

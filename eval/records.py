"""The stored predictions: one :class:`PredictionRecord` a line of ``predictions.jsonl``, so that an interrupted
run resumes from what it has (``read_records``). A stored answer is scored again on every run, against the
ground truth the annotations give now, never against the copy stored beside it."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eval.datasets import RefExample
from eval.predictors import Prediction
from eval.refexp import PredictedEntity, Score, score
from serve.kosmos2.grounding import Box

SCHEMA_VERSION = 3
"""Version of the layout of ``predictions.jsonl`` and ``summary.json`` (2: entities keep their span and pixel
boxes, and ``no_object`` is counted beside ``phrase_mismatch``; 3: 95% intervals, the dtype, and each split's
sources, box formats, partition, caveat and whether it stands beside the paper's column)."""


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

    def prediction(self) -> Prediction:
        """The stored answer, apart from what it was scored against."""
        return Prediction(self.text, self.entities, self.finish_reason, self.error)

    def answers(self, example: RefExample) -> bool:
        """Whether this record is the answer to ``example``'s question: the same expression about the same image."""
        return self.expression == example.expression and self.image_id == example.image_id

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


def read_records(path: Path, predictor: str, examples: Mapping[str, RefExample]) -> dict[str, PredictionRecord]:
    """The finished records of an earlier run for ``examples`` (by id; the last line per id wins), scored against
    the ground truth, image size and names those examples give now.

    The file is rewritten with the records so scored, without the lines that do not parse (a crash mid-write) or
    hold an error, so those are predicted again; lines of expressions outside this run are kept as they are. A
    record of another predictor, or one that answers another expression or image than its example now names,
    stops the run: its answer cannot be scored against this annotation.
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
    kept = {}
    for key, record in records.items():
        if record.error is not None:
            continue
        example = examples.get(key)
        if example is not None:
            if not record.answers(example):
                raise RunError(
                    f"{path}: the stored answer for {key!r} is to {record.expression!r} on image {record.image_id}, "
                    f"but the annotations now ask {example.expression!r} on image {example.image_id}; "
                    "choose another --out to predict again"
                )
            record = PredictionRecord.build(example, record.prediction(), predictor)
        kept[key] = record
    temporary = path.with_suffix(".jsonl.tmp")
    temporary.write_text("".join(r.to_json() + "\n" for r in kept.values()), encoding="utf-8")
    os.replace(temporary, path)
    return {k: r for k, r in kept.items() if k in examples}

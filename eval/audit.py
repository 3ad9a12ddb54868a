"""``python -m eval audit-tokens FILE...``: which expressions transformers' clean-up of tokenization spaces changes.

The real Kosmos-2 tokenizer config turns on ``clean_up_tokenization_spaces``, which rewrites ``" ,"``, ``" ."``,
``" 's"``, ``" n't"`` ... (:data:`CLEAN_UP`). A server that decodes with it echoes such an expression changed
("man , left" as "man, left"), and the official protocol, which compares the phrase with the expression as an
exact string, scores it as no box whatever the box. This service decodes without it (``serve.kosmos2.text``);
the audit counts, for any annotation file, how many expressions a server with the clean-up would lose that way.
It reads every format ``python -m eval run`` reads (refer pickle, MDETR json, Parquet, JSONL) and needs no images.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from eval.tables import guess_split, table_expressions

CLEAN_UP = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
)
"""transformers' ``PreTrainedTokenizerBase.clean_up_tokenization``, replacement by replacement, in its order."""


def clean_up(text: str) -> str:
    """``text`` as transformers' clean-up of tokenization spaces leaves it.

    >>> clean_up("man , left of the dog 's tail")
    "man, left of the dog's tail"
    """
    for old, new in CLEAN_UP:
        text = text.replace(old, new)
    return text


def touched(expression: str) -> bool:
    """Whether the clean-up changes the expression as the prompt carries it (spaces collapsed, stripped).

    >>> touched("man , left"), touched("man left"), touched("it isn't")
    (True, False, False)
    """
    phrase = " ".join(expression.split())
    return clean_up(phrase) != phrase


@dataclass
class Audit:
    """The count for one split of one file, and a few of the expressions touched."""

    path: str
    split: str
    n: int = 0
    touched: int = 0
    examples: list[str] = field(default_factory=list)


def file_expressions(path: str | Path) -> list[tuple[str, str]]:
    """(split, expression) of every expression in an annotation file, whatever its format.

    A refer pickle gives every split (``train`` included); an MDETR file the split of its name; a table its
    ``split`` column, else the split of its name.
    """
    path = Path(path)
    if path.suffix == ".p":
        with path.open("rb") as f:
            refs = pickle.load(f)
        return [(ref["split"], sentence["sent"]) for ref in refs for sentence in ref["sentences"]]
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        split = re.sub(r".*_", "", path.stem)
        return [(split, entry["caption"]) for entry in data["images"]]
    return [(split or guess_split(path), text) for split, text in table_expressions(path)]


def audit(paths: Sequence[str | Path], keep: int = 3) -> list[Audit]:
    """Per file and split, how many expressions the clean-up touches (and the first ``keep`` of them)."""
    results: list[Audit] = []
    for path in paths:
        by_split: dict[str, Audit] = {}
        for split, expression in file_expressions(path):
            entry = by_split.setdefault(split, Audit(str(path), split))
            entry.n += 1
            if touched(expression):
                entry.touched += 1
                if len(entry.examples) < keep:
                    entry.examples.append(expression)
        results += by_split.values()
    return results


def render(results: Sequence[Audit]) -> str:
    """The audit as a table, with the total."""
    lines = ["file\tsplit\texpressions\ttouched by the clean-up\texamples"]
    for r in results:
        lines.append(f"{r.path}\t{r.split or '-'}\t{r.n}\t{r.touched}\t{' | '.join(r.examples)}")
    lines.append(f"total\t\t{sum(r.n for r in results)}\t{sum(r.touched for r in results)}\t")
    return "\n".join(lines)

"""The Kosmos-2 tasks and their prompts.

Each task turns user input into the text that follows the image tokens in the model's prompt, in the form
the Kosmos-2 authors used. User text can never smuggle the model's own markup into a prompt: every tag,
patch-index and special token in it is removed first (the ``raw`` task alone passes text through verbatim,
for those who write prompts by hand).

    >>> build_prompt(Task.VQA, "What is <phrase>this</phrase>?").text
    '<grounding> Question: What is this? Answer:'
    >>> build_prompt(Task.DESCRIBE_REGION, region=(0.390625, 0.046875, 0.984375, 0.828125)).text
    '<grounding><phrase> It</phrase><object><patch_index_0044><patch_index_0863></object> is'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from serve.errors import InvalidRequest
from serve.kosmos2.grounding import Box, check_box, object_tokens


class Task(str, Enum):
    """What the model is asked to do with the image."""

    CAPTION = "caption"
    DETAILED_CAPTION = "detailed_caption"
    VQA = "vqa"
    GROUND = "ground"
    DESCRIBE_REGION = "describe_region"
    RAW = "raw"


@dataclass(frozen=True)
class Prompt:
    """The prompt text after the image tokens, and whether the answer repeats the prompt's words.

    With ``echo`` the answer is the whole clean text, prompt included ("An image of a dog", the grounded
    phrase itself); without it the prompt's words (a question, an instruction) are left out of the answer.
    """

    text: str
    echo: bool


MARKUP = re.compile(
    r"<patch_index_\d+>|</delimiter_of_multi_objects/>|</?(?:phrase|object|image|grounding|doc|chunk|line)>"
    r"|<s>|</s>|<pad>|<unk>|<mask>"
)
"""The model's own tokens as they can appear in text: tags, patch indices and the special tokens."""


def neutralize(text: str) -> str:
    """Remove the model's markup from user text, until none is left (so pieces cannot rejoin into a tag).

    >>> neutralize("a <phr<phrase>ase>dog</phrase> <patch_index_0042>")
    'a dog'
    """
    while True:
        cleaned = MARKUP.sub("", text)
        if cleaned == text:
            return " ".join(cleaned.split())
        text = cleaned


def build_prompt(task: Task, text: str | None = None, region: Box | None = None) -> Prompt:
    """The prompt for ``task``; raises :class:`InvalidRequest` when the input does not fit the task."""
    text = (text or "").strip()
    if task is not Task.DESCRIBE_REGION and region is not None:
        raise InvalidRequest(f"'region' is only used by the describe_region task, not {task.value}", param="region")
    if task is Task.RAW:
        if not text:
            raise InvalidRequest("the raw task needs the prompt as a text part", param="messages")
        return Prompt(text, echo=True)
    clean = neutralize(text)
    if text and not clean:
        raise InvalidRequest("the text holds nothing but model markup", param="messages")
    if task in (Task.CAPTION, Task.DETAILED_CAPTION, Task.DESCRIBE_REGION) and clean:
        raise InvalidRequest(f"the {task.value} task takes no text; use vqa for a question", param="messages")
    if task in (Task.VQA, Task.GROUND) and not clean:
        what = "a question" if task is Task.VQA else "the expression to ground"
        raise InvalidRequest(f"the {task.value} task needs {what} as a text part", param="messages")
    if task is Task.CAPTION:
        return Prompt("<grounding>An image of", echo=True)
    if task is Task.DETAILED_CAPTION:
        return Prompt("<grounding> Describe this image in detail:", echo=False)
    if task is Task.VQA:
        return Prompt(f"<grounding> Question: {clean} Answer:", echo=False)
    if task is Task.GROUND:
        return Prompt(f"<grounding><phrase> {clean}</phrase>", echo=True)
    if region is None:
        raise InvalidRequest("the describe_region task needs 'region': [x1, y1, x2, y2] in [0, 1]", param="region")
    try:
        box = check_box(region)
    except ValueError as exc:
        raise InvalidRequest(str(exc), param="region") from None
    return Prompt(f"<grounding><phrase> It</phrase>{object_tokens(box)} is", echo=True)

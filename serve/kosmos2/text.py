"""Token ids of prompts and clean, grounded text of answers: the tokenizer side of preprocessing.

``TextCodec.encode`` builds exactly the ids the Kosmos-2 processor builds for an image and a prompt
(``<s><image>`` 64 image slots ``</image>`` then the prompt); ``TextCodec.answer`` turns generated ids into the
clean answer and its entities, as the processor's ``post_process_generation`` would on the whole sequence.
``AnswerStream`` yields the same answer piece by piece while tokens arrive.

Every answer, of every task, is the text as the model wrote it: ids are decoded without transformers' clean-up
of tokenization spaces, which the real checkpoint's tokenizer config turns on and which rewrites ``" ,"``,
``" ."``, ``" 's"``, ``" n't"`` ... into ``","``, ``"."``, ``"'s"``, ``"n't"``. Sentencepiece already decodes the
spaces the model wrote, and the authors' fairseq code, demo and evaluation never rewrite them; the clean-up would
make a ``ground`` answer's phrase differ from the expression it echoes ("man , left" would come back as
"man, left", which the official RefCOCO evaluation scores as no box), and would let a streamed piece already sent
differ from the final text.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from transformers import Kosmos2Processor

from serve.kosmos2.grounding import TAG_PATTERN, Box, Entity, drop_prefix, extract_entities, to_pixels
from serve.kosmos2.tasks import Prompt


@dataclass(frozen=True)
class GroundedEntity:
    """An entity with its boxes both normalized and in the original image's pixels."""

    phrase: str
    span: tuple[int, int]
    boxes: list[Box]
    boxes_px: list[Box]


@dataclass(frozen=True)
class Answer:
    """The clean text of an answer and its grounded entities."""

    text: str
    entities: list[GroundedEntity]


class TextCodec:
    """Prompt encoding and answer decoding with one model's tokenizer."""

    def __init__(self, processor: Kosmos2Processor, image_tokens: int = 64) -> None:
        self.tokenizer = processor.tokenizer
        self.image_tokens = image_tokens
        self.first_image_id = self.tokenizer.unk_token_id + 1
        self._image_markup = " ".join([processor.boi_token] * (image_tokens + 1) + [processor.eoi_token])
        self.eoi_id = self.tokenizer.convert_tokens_to_ids(processor.eoi_token)
        self._remembered = functools.lru_cache(maxsize=4096)(self._tokenize)

    def encode(self, prompt_text: str) -> np.ndarray:
        """Prompt ids (int32, read-only) as the processor makes them for one image and this text. The last
        thousands of prompts are remembered: most requests repeat a task's fixed prompt, and tokenizing the
        image markup with it took about a tenth of a Preprocessor's CPU."""
        return self._remembered(prompt_text)

    def _tokenize(self, prompt_text: str) -> np.ndarray:
        text = f"{self.tokenizer.bos_token}{self._image_markup} {prompt_text.strip()}"
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids[2 : 2 + self.image_tokens] = range(self.first_image_id, self.first_image_id + self.image_tokens)
        array = np.asarray(ids, dtype=np.int32)
        array.flags.writeable = False
        return array

    def decode_after_image(self, prompt_ids: Sequence[int], generated: Sequence[int]) -> str:
        """Text of the prompt after ``</image>`` and the generated ids, special tokens skipped, spaces as written."""
        tail = list(prompt_ids[list(prompt_ids).index(self.eoi_id) + 1 :])
        return self.tokenizer.decode(
            tail + list(generated), skip_special_tokens=True, clean_up_tokenization_spaces=False
        )

    def answer(
        self, prompt: Prompt, prompt_ids: Sequence[int], generated: Sequence[int], width: int, height: int
    ) -> Answer:
        """Clean text and entities of a finished generation, boxes also scaled to ``width`` x ``height``."""
        clean, entities = extract_entities(self.decode_after_image(prompt_ids, generated))
        if not prompt.echo:
            clean, entities = drop_prefix(clean, entities, self.prompt_length(prompt_ids))
        return Answer(clean, [ground(e, width, height) for e in entities])

    def token_texts(self, token_ids: Sequence[int]) -> list[str]:
        """Each token's own text, as it reads alone: a word piece with its leading space, a tag as written."""
        return [self._token_text(token) for token in token_ids]

    @functools.lru_cache(maxsize=65536)  # noqa: B019 (one codec per process, the vocabulary bounds it)
    def _token_text(self, token: int) -> str:
        piece = self.tokenizer.convert_ids_to_tokens(int(token))
        return piece.replace("\u2581", " ") if piece is not None else ""

    def prompt_length(self, prompt_ids: Sequence[int]) -> int:
        """Characters of the prompt's own clean text (what a non-echo answer leaves out)."""
        return len(TAG_PATTERN.sub("", self.decode_after_image(prompt_ids, [])).strip())


def ground(entity: Entity, width: int, height: int) -> GroundedEntity:
    """Attach pixel boxes in the original image to an entity."""
    return GroundedEntity(
        entity.phrase, entity.span, entity.boxes, [to_pixels(box, width, height) for box in entity.boxes]
    )


class AnswerStream:
    """Incremental clean text of an answer: each ``push`` returns the new text that is now certain.

    Text stays held back while it could still change: trailing spaces (the final text is stripped), anything
    after an unclosed ``<`` (a tag could still close) and a trailing U+FFFD (a character whose bytes span
    tokens). ``holding`` says whether the last push held any back. The pieces joined equal ``Answer.text``.
    """

    def __init__(self, codec: TextCodec, prompt: Prompt, prompt_ids: Sequence[int]) -> None:
        self.codec = codec
        self.prompt_ids = list(prompt_ids)
        self.generated: list[int] = []
        self.skip = 0 if prompt.echo else codec.prompt_length(prompt_ids)
        self.sent = 0
        self.holding = False

    def push(self, tokens: Sequence[int]) -> str:
        self.generated.extend(tokens)
        raw = self.codec.decode_after_image(self.prompt_ids, self.generated)
        opening = raw.find("<", raw.rfind(">") + 1)  # the first "<" that no ">" closes yet: a tag may start there
        unclosed = opening >= 0
        if unclosed:
            raw = raw[:opening]
        text = _answer_text(TAG_PATTERN.sub("", raw), self.skip)
        stable = text.rstrip().removesuffix("\ufffd")
        self.holding = unclosed or len(stable) < len(text)
        return self._take(stable)

    def finish(self, final_text: str) -> str:
        """The rest of the answer, given the final clean text."""
        self.holding = False
        return self._take(final_text)

    def _take(self, text: str) -> str:
        piece = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return piece


def _answer_text(clean: str, skip: int) -> str:
    clean = clean.lstrip()
    return clean[skip:].lstrip() if skip else clean

"""The pixel engine: answers in Kosmos-2's token language from the pixels alone, a test and benchmarking aid.

Like vLLM's dummy load format, it serves without the model's weights (``engine.kind: pixels``, ``python -m serve
run --engine pixels``; ``docs/testing.md``), but unlike random weights its answers depend on the image: it boxes
the *shape*, the pixels whose colour differs from the image's top-left pixel (the *background*) by more than
``THRESHOLD`` levels in any channel. It reads exactly the 224x224x3 uint8 pixels the engine receives, after every
step of the image path, and writes token ids of the loaded processor's tokenizer (words, ``<phrase>``,
``<object>``, ``<patch_index_NNNN>``), so its answers go through the detokenizer, entity extraction and box scaling
that the model's go through, streamed or not. An image mirrored, turned, cropped, mis-scaled or swapped with
another between the client and the engine comes back with its box in the wrong place.

The box is written as Kosmos-2 writes one on its 32x32 grid of the 224x224 input: the cells of the shape's
top-left and bottom-right pixels (:func:`patch_indices`, ``serve.kosmos2.grounding.box_to_patch_indices`` of the
box around the shape's pixels). Colours are named by :func:`colour_name`: the shape's by the per-channel median
of its pixels, the background's by the top-left pixel.

The task is read from the end of the prompt after ``</image>``, so a ``raw`` prompt written like a task's gets
that task's answer. For a red shape on white at the top left (``BOX``: ``<object><patch_index_A><patch_index_B>
</object>``), by the prompt's ending, the tokens written and the answer the API returns:

- ``</phrase>`` (ground): ``BOX``; the expression, grounded.
- ``</object> is`` (describe_region): `` a red shape.`` if shape pixels lie in the region's cells (named by their
  colour), else `` the white background.``; "It is a red shape.".
- ``Answer:`` (vqa): ``<phrase> a red shape</phrase>BOX``; "a red shape".
- ``in detail:`` (detailed_caption): `` The image shows<phrase> a red shape</phrase>BOX on a white background,
  at the top left.`` (where the box's centre lies, by thirds of the image); the same without the tags.
- anything else (caption, raw): ``<phrase> a red shape</phrase>BOX``; "An image of a red shape".

Where no pixel differs from the top-left one, there is no box and the answer says so: "An image of nothing but
a plain white background", "The image is plain white, with nothing on it.", "nothing: the image is plain
white.", "<expression> is not in the image: it is plain white.", "It is the white background.".

Of the request's parameters, ``max_new_tokens`` cuts the answer (finish ``length``; a box cut short is no box, as
with the model), else the end token follows (``stop``); with ``ignore_eos`` the end token is repeated as an
ordinary token up to exactly ``max_new_tokens`` (it decodes to nothing, so the text is the same). Temperature,
top-p, seed and the n-gram ban do not apply: an image and a prompt have one answer, as under greedy decoding.
A streaming request gets its tokens one at a time. Like the hf engine, a step gathers the requests that arrive
within ``batch_wait_s`` of the first (up to ``max_batch_size``), so that requests share the engine as they would
share a model's batch; it answers them with a few array operations each, on the CPU, and needs no weights
(``serve.engine.build.load_for_engine``).

Every stretch of words is encoded by the tokenizer at construction, alone and stripped, and follows a space or a
tag in the answer (sentencepiece marks a stretch's first word with the space before it); the engine checks that
each decodes as written after a tag, and refuses a tokenizer that would rewrite them.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import numpy as np

from serve.engine.base import Engine
from serve.engine.config import EngineConfig
from serve.engine.model import LoadedModel
from serve.engine.requests import GenerationRequest, GenerationResult, Sink

THRESHOLD = 30
"""A pixel belongs to the shape when a channel differs from the top-left pixel's by more than this many levels."""

GRID = 32
"""Cells per side of Kosmos-2's patch-index grid."""

COLOURS = {
    "red": (220, 30, 30),
    "orange": (245, 140, 20),
    "yellow": (235, 220, 30),
    "green": (30, 170, 50),
    "cyan": (30, 200, 220),
    "blue": (30, 60, 220),
    "purple": (130, 50, 170),
    "pink": (245, 160, 190),
    "brown": (140, 80, 30),
}
"""The hues the engine names, and the RGB each stands for: a colour takes the nearest one's name."""

GRAY_SPREAD = 40
"""A colour whose channels lie within this many levels of one another is a gray, named by ``GRAYS``."""

GRAYS = ((60, "black"), (215, "gray"), (256, "white"))
"""The grays' names by their mean level: black below 60, gray below 215, white above."""

PLACES = (
    ("at the top left", "at the top", "at the top right"),
    ("at the left", "in the middle", "at the right"),
    ("at the bottom left", "at the bottom", "at the bottom right"),
)
"""Where a box's centre lies, by thirds of the image: row, then column."""

TASKS = ("ground", "describe_region", "vqa", "detailed_caption", "caption")
"""The answers the engine writes, by what the prompt ends with (``caption`` for any other ending)."""

_REGION = re.compile(r"<patch_index_(\d+)><patch_index_(\d+)></object>\s*is$")
_TAGS = ("<phrase>", "</phrase>", "<object>", "</object>")


@dataclass(frozen=True)
class Scene:
    """What the engine sees in an image: colour names, the shape's patch indices and its place (None: no shape)."""

    background: str
    shape: str | None
    cells: tuple[int, int]
    place: str


def shape_mask(pixels: np.ndarray) -> np.ndarray:
    """(H, W) booleans: the pixels whose colour differs from the top-left pixel by more than ``THRESHOLD``."""
    difference = np.abs(pixels.astype(np.int16) - pixels[0, 0].astype(np.int16))
    return (difference > THRESHOLD).any(axis=-1)


def patch_indices(top: int, left: int, bottom: int, right: int, side: int = 224, grid: int = GRID) -> tuple[int, int]:
    """Kosmos-2's two patch indices of the pixels ``top..bottom`` x ``left..right`` (inclusive) of a ``side``-pixel
    square: ``box_to_patch_indices`` of their normalized box ``(left, top, right + 1, bottom + 1) / side``, in
    integers.

    >>> patch_indices(0, 0, 223, 223)
    (0, 1023)
    >>> patch_indices(7, 14, 13, 20)  # exactly the cell in row 1, column 2
    (34, 34)
    >>> patch_indices(7, 14, 14, 21)  # one pixel more: the next cells
    (34, 67)
    """

    def first(pixel: int) -> int:
        return pixel * grid // side

    def last(pixel: int) -> int:
        return -(-(pixel + 1) * grid // side) - 1

    return first(top) * grid + first(left), last(bottom) * grid + last(right)


def colour_name(rgb: np.ndarray) -> str:
    """The name of an RGB colour: black, gray or white if its channels are close, else the nearest of ``COLOURS``.

    >>> colour_name(np.array([250, 10, 5])), colour_name(np.array([90, 95, 80])), colour_name(np.array([0, 0, 255]))
    ('red', 'gray', 'blue')
    """
    values = np.asarray(rgb, dtype=np.float64)
    if values.max() - values.min() < GRAY_SPREAD:
        return next(name for bound, name in GRAYS if values.mean() < bound)
    names = list(COLOURS)
    distances = np.linalg.norm(np.array([COLOURS[n] for n in names]) - values, axis=1)
    return names[int(distances.argmin())]


def read_scene(pixels: np.ndarray, grid: int = GRID) -> Scene:
    """The background's colour, and the shape's colour, patch indices and place (if any pixel differs)."""
    background = colour_name(pixels[0, 0])
    mask = shape_mask(pixels)
    if not mask.any():
        return Scene(background, None, (0, 0), "")
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    side = pixels.shape[0]
    place = PLACES[min(3 * (top + bottom) // (2 * side), 2)][min(3 * (left + right) // (2 * side), 2)]
    colour = colour_name(np.median(pixels[mask], axis=0))
    return Scene(background, colour, patch_indices(top, left, bottom, right, side, grid), place)


def region_colour(pixels: np.ndarray, first: int, last: int, grid: int = GRID) -> str | None:
    """The colour name of the shape's pixels inside the cells from patch index ``first`` to ``last``, or None."""
    side = pixels.shape[0]
    (top, left), (bottom, right) = divmod(first, grid), divmod(last, grid)
    rows = slice(top * side // grid, (bottom + 1) * side // grid)
    cols = slice(left * side // grid, (right + 1) * side // grid)
    inside = shape_mask(pixels)[rows, cols]
    return colour_name(np.median(pixels[rows, cols][inside], axis=0)) if inside.any() else None


def continuation(task: str, scene: Scene) -> list[str]:
    """The answer's parts for ``task``: tags and patch-index tokens (``<...>``), and stretches of words."""
    b, shape = scene.background, scene.shape
    box = ["<object>", f"<patch_index_{scene.cells[0]:04d}>", f"<patch_index_{scene.cells[1]:04d}>", "</object>"]
    grounded = ["<phrase>", f"a {shape} shape", "</phrase>", *box]
    if task == "describe_region":  # the caller puts the colour of the region's shape pixels in ``scene.shape``
        return [f"a {shape} shape." if shape else f"the {b} background."]
    if shape is None:
        return {
            "ground": [f"is not in the image: it is plain {b}."],
            "vqa": [f"nothing: the image is plain {b}."],
            "detailed_caption": [f"The image is plain {b}, with nothing on it."],
        }.get(task, [f"nothing but a plain {b} background"])
    return {
        "ground": box,
        "vqa": grounded,
        "detailed_caption": ["The image shows", *grounded, f"on a {b} background, {scene.place}."],
    }.get(task, grounded)


def every_stretch() -> set[str]:
    """Every stretch of words :func:`continuation` can write."""
    places = [place for row in PLACES for place in row]
    colours = [name for _, name in GRAYS] + list(COLOURS)
    scenes = [Scene(b, s, (0, 0), p) for b in colours for s in [None, *colours] for p in places]
    return {part for task in TASKS for scene in scenes for part in continuation(task, scene) if part[0] != "<"}


class PixelEngine(Engine):
    """Answers every task from the pixels (module docstring), in the loaded processor's tokens."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig) -> None:
        super().__init__(loaded, config)
        self.tokenizer = loaded.processor.tokenizer
        self.eoi_id: int = self.tokenizer.convert_tokens_to_ids(loaded.processor.eoi_token)
        specials = [*_TAGS, *(f"<patch_index_{i:04d}>" for i in range(GRID * GRID))]
        self.token_ids: dict[str, list[int]] = {tag: [self._tag_id(tag)] for tag in specials}
        self.token_ids.update({text: self._encode(text) for text in sorted(every_stretch())})

    def _tag_id(self, tag: str) -> int:
        token_id = self.tokenizer.convert_tokens_to_ids(tag)
        if token_id is None or token_id == self.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {tag} token: it is not a Kosmos-2 tokenizer")
        return token_id

    def _encode(self, text: str) -> list[int]:
        """A stretch's ids, checked to decode after a tag as a space and the stretch."""
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        decoded = self.tokenizer.decode(
            [self.token_ids["</object>"][0], *ids], skip_special_tokens=True, clean_up_tokenization_spaces=False
        )
        if decoded != f"</object> {text}":
            raise ValueError(f"the tokenizer decodes the pixel engine's {text!r} as {decoded!r}")
        return ids

    def step(self) -> float | None:
        if len(self.waiting) < self.config.max_batch_size:
            wait = self.waiting[0].arrived + self.config.batch_wait_s - time.monotonic()
            if wait > 0:
                return wait  # gather the requests that arrive together into one step, as the hf engine does
        for _ in range(min(len(self.waiting), self.config.max_batch_size)):
            pending = self.waiting.popleft()
            try:
                result = self.answer(pending.request, pending.sink)
            except Exception as exc:  # a defect here fails its request, not the others
                pending.sink.fail(exc)
                continue
            pending.sink.finish(result)
        return None

    def answer(self, request: GenerationRequest, sink: Sink) -> GenerationResult:
        """Generate for one request: stream its tokens to ``sink`` if it streams, and return its result."""
        ids = [token for part in self.parts(request) for token in self.token_ids[part]]
        params = request.params
        if params.ignore_eos:
            ids += [self.geometry.eos_id] * max(params.max_new_tokens - len(ids), 0)
        ids = ids[: params.max_new_tokens]
        reason = "length" if len(ids) == params.max_new_tokens else "stop"
        if sink.streaming:
            for token in ids:
                sink.tokens([token])
        return GenerationResult(ids, reason, len(request.prompt_ids), len(ids) + (reason == "stop"))

    def parts(self, request: GenerationRequest) -> list[str]:
        """The answer's parts for the task the prompt's end names, from the request's pixels."""
        prompt = [int(t) for t in request.prompt_ids]
        tail = prompt[prompt.index(self.eoi_id) + 1 :] if self.eoi_id in prompt else prompt
        text = self.tokenizer.decode(tail, skip_special_tokens=True, clean_up_tokenization_spaces=False).strip()
        scene = read_scene(request.pixels)
        if region := _REGION.search(text):
            colour = region_colour(request.pixels, int(region.group(1)), int(region.group(2)))
            return continuation("describe_region", Scene(scene.background, colour, scene.cells, scene.place))
        if text.endswith("</phrase>"):
            return continuation("ground", scene)
        if text.endswith("Answer:"):
            return continuation("vqa", scene)
        if text.endswith("in detail:"):
            return continuation("detailed_caption", scene)
        return continuation("caption", scene)

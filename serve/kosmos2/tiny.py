"""A tiny Kosmos-2 that needs no download: the fixture of every test and of the demo.

``python -m serve tiny DIR`` writes a model and processor (about 1 MB) that load with ``from_pretrained(DIR)``
like the real checkpoint, byte-identical on every run: a hand-made unigram vocabulary (a trained tokenizer
would differ run to run) configured as the real tokenizer is (``clean_up_tokenization_spaces`` on), the real
``Kosmos2Processor`` (which adds the 11 tag tokens and the 1,024 patch-index tokens), 64 image tokens, and
2-layer text and vision towers with seeded random weights. Its output is random text, but it runs every code
path the real model runs.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessorPil,
    Kosmos2Config,
    Kosmos2ForConditionalGeneration,
    Kosmos2Processor,
    XLMRobertaTokenizerFast,
)

WORDS = tuple(
    "a an the of in on at by with and is are it this that what where who which how many image picture "
    "photo man woman person people child dog cat horse bird car bus rocket astronaut coffee cup "
    "motorcycle snowman fire tree sky water grass table street building red green blue yellow white black "
    "small large big little left right top bottom middle front back circle square triangle star shape "
    "colour color question answer describe detail there sitting standing holding wearing looking next to "
    "near two three one".split()
)
CHARACTERS = string.ascii_letters + string.digits + ".,;:!?'\"-()/&%$#@+*=<>_"


REAL_VOCAB_SIZE = 65037
"""Vocabulary of the real checkpoint, tag and patch-index tokens included."""

ADDED_TOKENS = 11 + 1024
"""Tokens the processor adds: the tags and the patch indices."""


def vocabulary(size: int | None = None) -> list[tuple[str, float]]:
    """Pieces and scores of the tiny unigram model: specials, words, single characters, then filler pieces
    up to ``size`` entries (so that, with the processor's tokens added, a real-size vocabulary comes out)."""
    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("<mask>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + word, -3.0 - i / 1000) for i, word in enumerate(WORDS)]
    pieces += [(char, -8.0) for char in CHARACTERS] + [("▁" + char, -9.0) for char in CHARACTERS]
    if size is not None:
        pieces += [(f"▁filler{i:05d}", -20.0) for i in range(size - len(pieces))]
    return pieces


def build_processor(vocab_size: int | None = None) -> Kosmos2Processor:
    """The real Kosmos-2 processor around the tiny vocabulary and the CLIP image settings of the checkpoint.

    ``vocab_size`` pads the vocabulary so that the tokenizer, tags included, has that many tokens. The tokenizer
    turns on transformers' clean-up of tokenization spaces (``" ,"`` to ``","`` ...) by default, as the real
    checkpoint's ``tokenizer_config.json`` does, so that tests see what a default ``decode`` does to real answers."""
    pieces = vocabulary(None if vocab_size is None else vocab_size - ADDED_TOKENS)
    tokenizer = XLMRobertaTokenizerFast(vocab=pieces, clean_up_tokenization_spaces=True)
    image_processor = CLIPImageProcessorPil(
        size={"height": 224, "width": 224}, crop_size={"height": 224, "width": 224}, resample=3
    )
    return Kosmos2Processor(image_processor, tokenizer)


def build_model(vocab_size: int, seed: int = 0) -> Kosmos2ForConditionalGeneration:
    """A seeded 2-layer Kosmos-2 with 64 image tokens.

    Its text weights are drawn wider than a real initialisation and its output head is untied, so that greedy
    answers vary with the image, the prompt and every position (a tied tiny model repeats one token), and
    ``</s>`` is made likely enough to end some answers after a few tokens and others not at all. The weights are
    drawn here (:func:`draw_weights`), not by transformers' initialisation, whose order of draws changes between
    releases: the same model, and the same test expectations, on every release the project supports.
    """
    config = Kosmos2Config(
        text_config={
            "vocab_size": vocab_size,
            "embed_dim": 64,
            "layers": 2,
            "attention_heads": 4,
            "ffn_dim": 128,
            "max_position_embeddings": 512,
            "init_std": 0.3,
            "tie_word_embeddings": False,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 224,
            "patch_size": 14,
        },
        latent_query_num=64,
        tie_word_embeddings=False,
    )
    model = Kosmos2ForConditionalGeneration(config).eval()
    draw_weights(model, seed)
    with torch.no_grad():
        model.text_model.lm_head.weight[config.text_config.eos_token_id] *= 2.5
    return model


def draw_weights(model: Kosmos2ForConditionalGeneration, seed: int) -> None:
    """Draw every weight matrix, embedding and learned query of ``model`` from one seeded generator, in name order,
    at the scales of transformers' initialisation of Kosmos-2 (the text config's ``init_std`` for the text model and
    the image-to-text projection; CLIP's scales for the vision tower; unit for the latent queries). Biases and layer
    norms keep their zeros and ones, and the padding token's embedding its zeros."""
    vision = model.config.vision_config
    width, depth, factor = vision.hidden_size, vision.num_hidden_layers, vision.initializer_factor
    projection = width**-0.5 * (2 * depth) ** -0.5 * factor
    vision_scales = {
        "class_embedding": width**-0.5 * factor,
        "patch_embedding": vision.initializer_range * factor,
        "position_embedding": vision.initializer_range * factor,
        "q_proj": projection,
        "k_proj": projection,
        "v_proj": projection,
        "out_proj": width**-0.5 * factor,
        "fc1": (2 * width) ** -0.5 * factor,
        "fc2": projection,
    }
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            if parameter.dim() < 2 and not name.endswith("class_embedding"):
                continue  # biases and layer norms
            if name.startswith("vision_model."):
                scale = next(value for part, value in vision_scales.items() if f".{part}" in name)
            else:
                scale = 1.0 if name.endswith("latent_query") else model.config.text_config.init_std
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
        embeddings = model.text_model.model.embed_tokens
        embeddings.weight[embeddings.padding_idx] = 0


def write_tiny(directory: str | Path, real_size: bool = False) -> Path:
    """Write the tiny model and processor to ``directory`` and return it.

    With ``real_size`` it writes the real checkpoint's architecture (1.66B parameters) and a processor with a
    vocabulary of its size, but no weights: load it with ``load_format="dummy"`` to benchmark on random weights.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if real_size:
        build_processor(REAL_VOCAB_SIZE).save_pretrained(directory)
        Kosmos2Config().save_pretrained(directory)
        return directory
    processor = build_processor()
    build_model(len(processor.tokenizer)).save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory

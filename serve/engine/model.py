"""Loading Kosmos-2 (weights and processor) from a Hugging Face id or a local folder.

``load_model("microsoft/kosmos-2-patch14-224")`` reads the checkpoint from a local folder, the Hugging Face
cache, or the hub, in the dtype and on the device asked for (``auto``: float16 on CUDA, float32 on CPU).
With ``load_format="dummy"`` the weights are random, drawn on the device, for benchmarking the real
architecture where the checkpoint cannot be had (``python -m serve tiny DIR --real-size`` writes its config);
with ``load_format="meta"`` the model is its architecture on PyTorch's meta device, no memory and no weights read,
for an engine that needs only the config and the processor (the pixel engine).
Either way the loaded model's image-to-text attention is made bidirectional (:func:`make_projection_bidirectional`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, Kosmos2ForConditionalGeneration, Kosmos2Processor

from serve.engine.config import DEFAULT_MODEL

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded from anywhere this machine can reach."""


@dataclass
class LoadedModel:
    """A Kosmos-2 model in eval mode, where it runs, and its processor."""

    model: Kosmos2ForConditionalGeneration
    processor: Kosmos2Processor
    device: torch.device
    dtype: torch.dtype


class ModelGeometry:
    """Token ids and sizes the engines need from a loaded model."""

    def __init__(self, loaded: LoadedModel) -> None:
        config = loaded.model.config
        self.pad_id: int = config.text_config.pad_token_id
        self.eos_id: int = config.text_config.eos_token_id
        self.image_tokens: int = config.latent_query_num
        processor = loaded.processor.image_processor
        self.mean = torch.tensor(processor.image_mean, device=loaded.device).view(1, 3, 1, 1)
        self.std = torch.tensor(processor.image_std, device=loaded.device).view(1, 3, 1, 1)
        self.scale = float(processor.rescale_factor)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is float16 on CUDA (the precision Kosmos-2 was trained in) and float32 elsewhere."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of auto, {', '.join(names)}; got {dtype!r}")
    return names[dtype]


def load_processor(model: str) -> Kosmos2Processor:
    """The model's processor, with the PIL image backend so that every machine preprocesses alike."""
    try:
        return Kosmos2Processor.from_pretrained(model, backend="pil")
    except OSError as exc:
        raise _unavailable(model, exc) from None


def load_model(
    model: str = DEFAULT_MODEL, *, device: str = "auto", dtype: str = "auto", load_format: str = "auto"
) -> LoadedModel:
    """Load weights and processor; raises :class:`ModelUnavailable` with one sentence saying what to do."""
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    processor = load_processor(model)
    try:
        if load_format in ("dummy", "meta"):
            config = AutoConfig.from_pretrained(model)
            with torch.device("meta" if load_format == "meta" else target):
                network = Kosmos2ForConditionalGeneration._from_config(config, dtype=torch_dtype)
        elif load_format == "auto":
            network = Kosmos2ForConditionalGeneration.from_pretrained(model, dtype=torch_dtype).to(target)
        else:
            raise ValueError(f"load_format must be auto, dummy or meta, got {load_format!r}")
    except OSError as exc:
        raise _unavailable(model, exc) from None
    network.eval().requires_grad_(False)
    make_projection_bidirectional(network.image_to_text_projection)
    log.info("loaded %s (%s weights) on %s in %s", model, load_format, target, torch_dtype)
    return LoadedModel(network, processor, target, torch_dtype)


def make_projection_bidirectional(projection: torch.nn.Module) -> None:
    """Make the attention of the image-to-text projection (``Kosmos2ImageToTextProjection``) bidirectional, as
    Kosmos-2's is: its 64 latent queries attend to every image feature and to one another. Transformers 5.x before
    5.23 build it as a decoder's attention (``is_causal = True``), so under SDPA each latent query ``i`` attends to
    the first ``i + 1`` features only (the keys cut to the queries' 64): image embeddings unlike the original
    model's. 5.23 builds it bidirectional; on older releases (the GPU machines' 5.17) this sets it so."""
    projection.x_attn.is_causal = False


def _unavailable(model: str, exc: OSError) -> ModelUnavailable:
    if Path(model).is_dir():
        return ModelUnavailable(f"the folder {model!r} does not hold a Kosmos-2 model and processor ({exc})")
    return ModelUnavailable(
        f"cannot load {model!r}: it is not a local folder, not in the Hugging Face cache, and the hub cannot be "
        f"reached; download it where the hub is reachable, or serve the tiny offline model instead with "
        f"`python -m serve tiny ./tiny-kosmos2 && python -m serve run --model ./tiny-kosmos2`"
    )

"""The fast engine's model runner: Kosmos-2's forward passes over a static KV cache.

The text decoder is re-implemented here for one purpose, the step over a preallocated cache: it calls the
Hugging Face modules' own layers (same weights, same functions) and writes keys and values into
``[slots + 1, heads, max_seq_len, head_dim]`` tensors, the last slot a scratch slot that the padding rows of
an admission write. Two passes run on it:

- an admission (:meth:`ModelRunner.admission_forward`): the vision tower and the image-to-text projection for a
  batch of images, then the prefill of their prompts with the image embeddings in place, SDPA with a causal
  mask, which fills each target slot's cache and returns the logits at each prompt's last token;
- a decode step (:meth:`ModelRunner.decode_forward`): one token for each of the first ``batch`` slots, attended
  with the Triton kernel of :mod:`serve.engine.kernels.attention` (which reads each sequence's own length from
  the device) or with SDPA over the first ``span`` positions and a length mask.

Both read their inputs from device buffers that stay in place (:attr:`ModelRunner.step_inputs`,
:class:`AdmissionInputs`), so that a CUDA graph captured from either replays on new inputs. The layers are
:mod:`serve.engine.fast.layers`' functions, compiled on CUDA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from serve.engine.config import EngineConfig
from serve.engine.fast.layers import (
    ImageProjection,
    LayerSteps,
    PatchEmbedding,
    compiled_steps,
    fuse_qkv,
    image_to_text,
    merge_heads,
)
from serve.engine.kernels.attention import decode_attention, triton_available, write_cache
from serve.engine.model import LoadedModel, ModelGeometry

VOCAB_ALIGN = 64
"""The output projection's rows are padded to a multiple of this (aligned matrix-product kernels)."""
COMPILE_WIDTH = 19
"""The prompt width that compiles the admission's layers: a size no other dimension has, so that the compiled
code does not assume two dimensions equal (Dynamo's duck sizing)."""


def resolve_attention(choice: str, device: torch.device) -> str:
    """The decode attention to use: ``auto`` is the Triton kernel where it can run, else SDPA."""
    if choice == "auto":
        return "triton" if triton_available(device) else "sdpa"
    if choice == "triton" and not triton_available(device):
        raise ValueError(f"decode_attention triton needs a CUDA device and the triton package; on {device} use sdpa")
    return choice


def wants_compile(choice: str, device: torch.device) -> bool:
    """Whether to compile the layers: ``auto`` compiles on CUDA (on the CPU it would only add start time)."""
    return choice == "on" or (choice == "auto" and device.type == "cuda")


@dataclass(frozen=True)
class AdmissionInputs:
    """An admission's inputs on the device, one row a request, room for every slot; the first rows serve."""

    pixels: torch.Tensor
    """``[slots, 224, 224, 3]`` uint8 images."""
    ids: torch.Tensor
    """``[slots, max_seq_len]`` prompt ids, pad ids after each prompt."""
    offsets: torch.Tensor
    last: torch.Tensor
    """Each row's image offset and last prompt position."""
    slots: torch.Tensor
    """Each row's target cache slot (the scratch slot for padding rows)."""


class ModelRunner:
    """The model's layers, the KV cache of ``max_batch_size`` slots (and the scratch slot) of ``max_seq_len``
    tokens, and the device buffers the forward passes read."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig, geometry: ModelGeometry) -> None:
        text = loaded.model.text_model
        self.decoder = text.model
        self.geometry = geometry
        slots, length = config.max_batch_size, config.max_seq_len
        self.heads = text.config.attention_heads
        self.head_dim = text.config.embed_dim // self.heads
        device, dtype = loaded.device, loaded.dtype
        positions = self.decoder.embed_positions.weights
        first = geometry.pad_id + 1
        if first + length > positions.shape[0]:
            raise ValueError(f"max_seq_len {length} exceeds the model's {positions.shape[0] - first} positions")
        self.position_table = positions[first : first + length].to(device=device, dtype=dtype)
        self.attention = resolve_attention(config.decode_attention, device)
        self.steps = compiled_steps() if wants_compile(config.compile, device) else LayerSteps()
        self.qkv = [fuse_qkv(layer.self_attn) for layer in self.decoder.layers]
        self.tower = loaded.model.vision_model.model
        self.patches = PatchEmbedding.of(self.tower.embeddings, geometry.mean, geometry.std, geometry.scale)
        self.projection = ImageProjection.of(loaded.model.image_to_text_projection)
        # The output projection padded with zero rows to a multiple of 64: an odd vocabulary (Kosmos-2's 65,037)
        # leaves cuBLAS only unaligned kernels, about a fifth of a decode step at batch 512 on an H200.
        head = text.lm_head.weight
        self.vocab = head.shape[0]
        self.head = F.pad(head, (0, 0, 0, -self.vocab % VOCAB_ALIGN))
        self.scratch = slots
        """The extra cache slot, written by the padding rows of padded admissions."""
        shape = (slots + 1, self.heads, length, self.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.decoder.layers]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in self.decoder.layers]
        self.step_inputs = torch.zeros((2, slots), dtype=torch.long, device=device)
        """A decode step's inputs, copied in one piece: each slot's last token, and its position."""
        self.input_tokens, self.input_index = self.step_inputs
        self.admission = AdmissionInputs(
            pixels=torch.zeros((slots, 224, 224, 3), dtype=torch.uint8, device=device),
            ids=torch.full((slots, length), geometry.pad_id, dtype=torch.long, device=device),
            offsets=torch.zeros(slots, dtype=torch.long, device=device),
            last=torch.zeros(slots, dtype=torch.long, device=device),
            slots=torch.full((slots,), self.scratch, dtype=torch.long, device=device),
        )
        self.slot_index = torch.arange(slots, device=device)
        self.time_index = torch.arange(length, device=device)

    def admission_forward(self, rows: int, width: int) -> torch.Tensor:
        """Vision and prefill for the first ``rows`` admission inputs, ``width`` tokens each: fill the target
        slots' caches, and return the logits at each prompt's last token."""
        inputs, image_tokens = self.admission, self.geometry.image_tokens
        image = self.encode(inputs.pixels[:rows])
        place = self.time_index[None, :width] - inputs.offsets[:rows, None]
        is_image = (place >= 0) & (place < image_tokens)
        pictured = image[self.slot_index[:rows, None], place.clamp(0, image_tokens - 1)]
        tokens = self.decoder.embed_tokens(inputs.ids[:rows, :width])
        embeds = torch.where(is_image[..., None], pictured.to(tokens.dtype), tokens)
        hidden = embeds * self.decoder.embed_scale + self.position_table[:width]
        targets, rows_index, last = inputs.slots[:rows], self.slot_index[:rows], inputs.last[:rows]
        *layers, final = zip(self.decoder.layers, self.qkv, self.keys, self.values)
        for layer, qkv, keys, values in layers:
            q, k, v = self.steps.attention_inputs(layer, qkv, hidden, self.head_dim)
            write_cache(keys, values, k, v, targets)
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            hidden = self.steps.layer_output(layer, hidden, merge_heads(mixed))
        # The last layer's keys and values fill the cache at every position, but only each prompt's last position
        # goes on to the logits: its attention, projection and feed-forward block run for that position alone.
        layer, qkv, keys, values = final
        q, k, v = self.steps.attention_inputs(layer, qkv, hidden, self.head_dim)
        write_cache(keys, values, k, v, targets)
        query = q[rows_index, :, last][:, :, None]
        visible = (self.time_index[None, :width] <= last[:, None])[:, None, None, :]
        mixed = F.scaled_dot_product_attention(query, k, v, attn_mask=visible)
        hidden = self.steps.layer_output(layer, hidden[rows_index, last][:, None], merge_heads(mixed))
        return self.logits(hidden[:, 0])

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image embeddings of ``(B, 224, 224, 3)`` uint8 pixels on the device, through the engine's layers."""
        hidden = self.steps.vision_embeddings(self.patches, self.tower.pre_layrnorm, pixels)
        for layer in self.tower.encoder.layers:
            hidden = self.steps.vision(layer, hidden)
        return image_to_text(self.projection, F.normalize(self.tower.post_layernorm(hidden), dim=-1))

    def decode_forward(self, batch: int, span: int) -> torch.Tensor:
        """One token for slots ``[0, batch)``: write its keys and values at ``input_index``, attend (SDPA: over
        the first ``span`` positions), and return the next-token logits. Slots in the range with no step to run
        compute garbage nobody reads."""
        tokens, where = self.input_tokens[:batch], self.input_index[:batch]
        hidden = self.decoder.embed_tokens(tokens) * self.decoder.embed_scale + self.position_table[where]
        hidden = hidden[:, None]
        visible = (self.time_index[:span][None, :] <= where[:, None])[:, None, None, :] if span else None
        slots, lengths, scale = self.slot_index[:batch], where + 1, self.head_dim**-0.5
        for layer, qkv, keys, values in zip(self.decoder.layers, self.qkv, self.keys, self.values):
            q, k, v = self.steps.attention_inputs(layer, qkv, hidden, self.head_dim)
            if self.attention == "triton":  # the kernel writes the new key and value into the cache itself
                mixed = decode_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], keys, values, lengths, scale)
                mixed = mixed.view(batch, 1, -1)
            else:
                keys[slots, :, where] = k[:, :, 0]
                values[slots, :, where] = v[:, :, 0]
                mixed = merge_heads(
                    F.scaled_dot_product_attention(
                        q, keys[:batch, :, :span], values[:batch, :, :span], attn_mask=visible
                    )
                )
            hidden = self.steps.layer_output(layer, hidden, mixed)
        return self.logits(hidden[:, 0])

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The next-token logits of final hidden states (a view without the padding columns)."""
        return F.linear(self.decoder.layer_norm(hidden), self.head)[:, : self.vocab]

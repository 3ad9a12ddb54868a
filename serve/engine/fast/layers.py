"""Transformer layers as the fast engine runs them: plain functions of the Hugging Face layer modules (their
own weights and submodules), with the decoder's attention left to the caller.

Written as functions of a layer, one compiled function serves every layer of a tower and every batch size:
``torch.compile(dynamic=True)`` takes the layer's weights as inputs, not as constants, so compiling traces one
layer once. Compiled, each layer's elementwise work (layer norms with the residual adds before them, the
activation, the head transposes) runs as a few fused kernels instead of a dozen; the matrix products stay cuBLAS's.
The feed-forward blocks' middles are the exception: the kernels of :mod:`serve.engine.kernels.ffn` run them between
the compiled parts (the text block's GELU and inner layer norm, which Inductor fuses into a kernel slower than
eager's two, and the vision MLP's quick GELU, in place). Each block's second projection adds its residual in the
matrix product's epilogue (:func:`add_projection_`), its bias having been added to the residual by the compiled
part before it: no separate kernel reads and writes the hidden states for the add. :class:`LayerSteps` holds the
functions as written, :func:`compiled_steps` compiled.

The vision tower's embeddings run as :func:`vision_embeddings`: the CLIP normalization of uint8 pixels and the
unfolding of patches in one pass, the patch convolution (with the class embedding) as one matrix product
(:class:`PatchEmbedding`), the position embeddings and the tower's first layer norm in one more pass. The model's
own path normalizes in four elementwise passes, then runs a convolution that reaches about 40 TFLOP/s on an H200,
far below a matrix product's rate. The image-to-text projection runs as :func:`image_to_text`, its first projection
folded into its keys' and values' (:class:`ImageProjection`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import GELUActivation, QuickGELUActivation

from serve.engine.kernels.ffn import gelu_layer_norm, quick_gelu_


def split_heads(states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, T, H * D]`` -> ``[B, H, T, D]``."""
    batch, length, _ = states.shape
    return states.view(batch, length, -1, head_dim).transpose(1, 2)


def merge_heads(mixed: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B, T, H * D]``."""
    batch, _, length, _ = mixed.shape
    return mixed.transpose(1, 2).reshape(batch, length, -1)


@dataclass(frozen=True)
class PatchEmbedding:
    """The vision tower's embeddings (``Kosmos2VisionEmbeddings``) as :func:`vision_embeddings` computes them.

    ``weight`` ``[D, K]``: the patch convolution's kernel, its inputs ordered (row, column, channel) as a patch
    of channels-last pixels unfolds; then the class embedding, picked by an indicator input; then zero columns
    to a multiple of 8 (aligned matrix-product kernels). ``indicator`` ``[K]``: the input row that picks the class
    embedding. ``positions`` ``[1 + patches, D]``: the position embeddings. ``mean``, ``std`` (float32, per
    channel) and ``scale``: the processor's normalization. ``size``: the side of a patch, in pixels."""

    weight: torch.Tensor
    indicator: torch.Tensor
    positions: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    scale: float
    size: int

    @classmethod
    def of(cls, embeddings: torch.nn.Module, mean: torch.Tensor, std: torch.Tensor, scale: float) -> PatchEmbedding:
        """From the tower's embeddings module and the processor's normalization (``mean``, ``std``: 3 values)."""
        kernel = embeddings.patch_embedding.weight  # [D, C, size, size]
        columns = kernel.permute(0, 2, 3, 1).reshape(kernel.shape[0], -1)
        weight = torch.cat([columns, embeddings.class_embedding[:, None]], dim=1)
        weight = F.pad(weight, (0, -weight.shape[1] % 8)).contiguous()
        indicator = torch.zeros_like(weight[0])
        indicator[columns.shape[1]] = 1
        positions = embeddings.position_embedding.weight
        mean, std = mean.reshape(-1).float(), std.reshape(-1).float()
        return cls(weight, indicator, positions, mean, std, scale, embeddings.patch_size)


def vision_embeddings(patches: PatchEmbedding, norm: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """The vision tower's input to its first layer, ``norm`` (``pre_layrnorm``) of its embeddings, from
    ``(B, H, W, C)`` uint8 pixels: normalized as the processor does (float32, then the weights' dtype), each
    image's rows the class indicator and its unfolded patches, one matrix product, the positions added."""
    batch, height, width, channels = pixels.shape
    size, weight = patches.size, patches.weight
    values = ((pixels.float() * patches.scale - patches.mean) / patches.std).to(weight.dtype)
    grid = values.view(batch, height // size, size, width // size, size, channels).permute(0, 1, 3, 2, 4, 5)
    unfolded = grid.reshape(batch, -1, size * size * channels)
    spare = weight.shape[1] - unfolded.shape[-1]
    rows = torch.cat([patches.indicator.expand(batch, 1, -1), F.pad(unfolded, (0, spare))], dim=1)
    return norm(torch.matmul(rows, weight.t()) + patches.positions)


@dataclass(frozen=True)
class ImageProjection:
    """The image-to-text projection (``Kosmos2ImageToTextProjection``) as :func:`image_to_text` computes it.

    The model projects the vision features (``dense``), then lets its 64 learned latent queries attend over those
    and themselves (``x_attn``). Here the keys and values of the features come from one product with ``dense``
    folded into ``k_proj`` and ``v_proj`` (``kv_weight``, ``kv_bias``: computed in float32; about a third of the
    projection's arithmetic), and the latents' queries, keys and values (the same for every image) are computed
    once: ``latent_q``, ``latent_k``, ``latent_v`` ``[heads, latents, head_dim]``. ``out_proj``: the attention's
    output projection."""

    kv_weight: torch.Tensor
    kv_bias: torch.Tensor
    latent_q: torch.Tensor
    latent_k: torch.Tensor
    latent_v: torch.Tensor
    out_proj: torch.nn.Module
    scale: float

    @classmethod
    def of(cls, projection: torch.nn.Module) -> ImageProjection:
        """From the model's ``image_to_text_projection``."""
        attention, dense, latents = projection.x_attn, projection.dense, projection.latent_query
        folded = [
            (proj.weight.float() @ dense.weight.float(), proj.weight.float() @ dense.bias.float() + proj.bias.float())
            for proj in (attention.k_proj, attention.v_proj)
        ]
        weight, bias = (torch.cat(parts).to(dense.weight.dtype) for parts in zip(*folded))
        projections = (attention.q_proj, attention.k_proj, attention.v_proj)
        q, k, v = (split_heads(proj(latents)[None], attention.head_dim)[0] for proj in projections)
        return cls(weight, bias, q, k, v, attention.out_proj, attention.scaling)


def image_to_text(projection: ImageProjection, features: torch.Tensor) -> torch.Tensor:
    """Image embeddings ``(B, latents, text width)`` from the vision tower's normalized features ``(B, 257,
    width)``: the latent queries attend over the features' keys and values, and their own."""
    batch, head_dim = features.shape[0], projection.latent_q.shape[-1]
    projected = F.linear(features, projection.kv_weight, projection.kv_bias)
    keys, values = (split_heads(part, head_dim) for part in projected.chunk(2, dim=-1))
    keys = torch.cat([keys, projection.latent_k.expand(batch, -1, -1, -1)], dim=2)
    values = torch.cat([values, projection.latent_v.expand(batch, -1, -1, -1)], dim=2)
    query = projection.latent_q.expand(batch, -1, -1, -1)
    mixed = F.scaled_dot_product_attention(query, keys, values, scale=projection.scale)
    return projection.out_proj(merge_heads(mixed))


def add_projection_(residual: torch.Tensor, inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``residual + inputs @ weight.T`` written over ``residual`` (contiguous), which is returned: one matrix
    product whose epilogue reads the residual, instead of a product and an add that reads both again."""
    flat = residual.view(-1, residual.shape[-1])
    flat.addmm_(inputs.reshape(-1, inputs.shape[-1]), weight.t())
    return residual


def vision_attention(layer: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer of the vision tower (``Kosmos2VisionEncoderLayer``) up to the middle of its MLP: the attention
    (bidirectional SDPA, as the model's own) with its residual, plus the MLP's second bias (the ``residual``
    :func:`vision_mlp_output` adds to), and the MLP's first projection of its normed input (``inner``)."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden)
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    q, k, v = (split_heads(proj(normed), attention.head_dim) for proj in projections)
    mixed = F.scaled_dot_product_attention(q, k, v, scale=attention.scale)
    hidden = hidden + attention.out_proj(merge_heads(mixed))
    return hidden + layer.mlp.fc2.bias, layer.mlp.fc1(layer.layer_norm2(hidden))


def vision_mlp_output(mlp: torch.nn.Module, residual: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The rest of the vision MLP after :func:`vision_attention`: the activation (in place; one kernel for the
    quick GELU, Kosmos-2's) and the second projection, added to ``residual`` in place."""
    quick = isinstance(mlp.activation_fn, QuickGELUActivation)
    return add_projection_(residual, quick_gelu_(inner) if quick else mlp.activation_fn(inner), mlp.fc2.weight)


def fuse_qkv(attention: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The query, key and value projections of a text attention as one weight and bias (one matrix product)."""
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    return torch.cat([p.weight for p in projections]), torch.cat([p.bias for p in projections])


def attention_inputs(
    layer: torch.nn.Module, qkv: tuple[torch.Tensor, torch.Tensor], hidden: torch.Tensor, head_dim: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A text decoder layer up to its attention: queries, keys and values ``[B, H, T, D]`` of ``hidden``;
    ``qkv`` is the layer's :func:`fuse_qkv`."""
    projected = F.linear(layer.self_attn_layer_norm(hidden), *qkv)
    return tuple(split_heads(part, head_dim) for part in projected.chunk(3, dim=-1))


def attention_output(
    layer: torch.nn.Module, hidden: torch.Tensor, mixed: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A text decoder layer after its attention (``mixed``, heads merged: ``[B, T, H * D]``) up to the middle of
    its feed-forward block: the attention's sub-layer norm, output projection and residual, plus the block's second
    bias (the ``residual`` :func:`feed_forward_output` adds to), and the block's first projection of its normed
    input (``inner``)."""
    attention = layer.self_attn
    hidden = hidden + attention.out_proj(attention.inner_attn_ln(mixed))
    return hidden + layer.ffn.fc2.bias, layer.ffn.fc1(layer.final_layer_norm(hidden))


def feed_forward_output(ffn: torch.nn.Module, residual: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The rest of the feed-forward block (``Kosmos2TextFFN``) after :func:`attention_output`: activation and
    inner layer norm (one kernel for the exact GELU, Kosmos-2's), the second projection added to ``residual`` in
    place."""
    norm = ffn.ffn_layernorm
    if isinstance(ffn.activation_fn, GELUActivation) and ffn.activation_fn.act is F.gelu:
        middle = gelu_layer_norm(inner, norm.weight, norm.bias, norm.eps)
    else:
        middle = norm(ffn.activation_fn(inner))
    return add_projection_(residual, middle, ffn.fc2.weight)


@dataclass(frozen=True)
class LayerSteps:
    """The layer functions the fast engine calls, and whether they are compiled."""

    vision_embeddings: Callable[..., torch.Tensor] = vision_embeddings
    vision_attention: Callable[..., tuple[torch.Tensor, torch.Tensor]] = vision_attention
    attention_inputs: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = attention_inputs
    attention_output: Callable[..., tuple[torch.Tensor, torch.Tensor]] = attention_output
    compiled: bool = False

    def vision(self, layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """One layer of the vision tower: its output hidden states."""
        hidden, inner = self.vision_attention(layer, hidden)
        return vision_mlp_output(layer.mlp, hidden, inner)

    def layer_output(self, layer: torch.nn.Module, hidden: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
        """The rest of a text decoder layer after its attention: the layer's output hidden states."""
        hidden, inner = self.attention_output(layer, hidden, mixed)
        return feed_forward_output(layer.ffn, hidden, inner)


@functools.cache
def compiled_steps() -> LayerSteps:
    """The functions under ``torch.compile``, compiled on first call for any batch size and length. One set a
    process: every engine shares its compiled code (Dynamo caches per function and caps its recompiles)."""

    def compiled(function: Callable) -> Callable:
        return torch.compile(function, dynamic=True, fullgraph=True)

    return LayerSteps(
        compiled(vision_embeddings),
        compiled(vision_attention),
        compiled(attention_inputs),
        compiled(attention_output),
        compiled=True,
    )

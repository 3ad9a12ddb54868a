"""Transformer layers as the fast engine runs them: plain functions of the Hugging Face layer modules (their
own weights and submodules), with the decoder's attention left to the caller.

Written as functions of a layer, one compiled function serves every layer of a tower and every batch size:
``torch.compile(dynamic=True)`` takes the layer's weights as inputs, not as constants, so compiling traces
one layer once. Compiled, each layer's elementwise work (layer norms with the residual adds before them, the
activation, the head transposes) runs as a few fused kernels instead of a dozen; the matrix products stay
cuBLAS's. :class:`LayerSteps` holds the three functions as written, :func:`compiled_steps` compiled.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def split_heads(states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, T, H * D]`` -> ``[B, H, T, D]``."""
    batch, length, _ = states.shape
    return states.view(batch, length, -1, head_dim).transpose(1, 2)


def merge_heads(mixed: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B, T, H * D]``."""
    batch, _, length, _ = mixed.shape
    return mixed.transpose(1, 2).reshape(batch, length, -1)


def vision_layer(layer: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """One layer of the vision tower (``Kosmos2VisionEncoderLayer``), bidirectional SDPA as the model's own."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden)
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    q, k, v = (split_heads(proj(normed), attention.head_dim) for proj in projections)
    mixed = F.scaled_dot_product_attention(q, k, v, scale=attention.scale)
    hidden = hidden + attention.out_proj(merge_heads(mixed))
    return hidden + layer.mlp(layer.layer_norm2(hidden))


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


def layer_output(layer: torch.nn.Module, hidden: torch.Tensor, mixed: torch.Tensor) -> torch.Tensor:
    """The rest of a text decoder layer after its attention (``mixed``, heads merged: ``[B, T, H * D]``): the
    attention's sub-layer norm and output projection, the residual, and the feed-forward block."""
    attention = layer.self_attn
    hidden = hidden + attention.out_proj(attention.inner_attn_ln(mixed))
    return hidden + layer.ffn(layer.final_layer_norm(hidden))


@dataclass(frozen=True)
class LayerSteps:
    """The layer functions the fast engine calls, and whether they are compiled."""

    vision: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] = vision_layer
    attention_inputs: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = attention_inputs
    layer_output: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] = layer_output
    compiled: bool = False


@functools.cache
def compiled_steps() -> LayerSteps:
    """The functions under ``torch.compile``, compiled on first call for any batch size and length. One set a
    process: every engine shares its compiled code (Dynamo caches per function and caps its recompiles)."""

    def compiled(function: Callable) -> Callable:
        return torch.compile(function, dynamic=True, fullgraph=True)

    return LayerSteps(compiled(vision_layer), compiled(attention_inputs), compiled(layer_output), compiled=True)

"""Transformer layers as the fast engine runs them: plain functions of the Hugging Face layer modules (their
own weights and submodules), with the decoder's attention left to the caller.

Written as functions of a layer, one compiled function serves every layer of a tower and every batch size:
``torch.compile(dynamic=True)`` takes the layer's weights as inputs, not as constants, so compiling traces
one layer once. Compiled, each layer's elementwise work (layer norms with the residual adds before them, the
activation, the head transposes) runs as a few fused kernels instead of a dozen; the matrix products stay
cuBLAS's. The feed-forward blocks' middles are the exception: :mod:`serve.ffn`'s kernels run them between the
compiled parts (the text block's GELU and inner layer norm, whose fusion by Inductor was slower than eager, and
the vision MLP's quick GELU, in place). :class:`LayerSteps` holds the functions as written,
:func:`compiled_steps` compiled.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.activations import GELUActivation, QuickGELUActivation

from serve.ffn import gelu_layer_norm, quick_gelu_


def split_heads(states: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``[B, T, H * D]`` -> ``[B, H, T, D]``."""
    batch, length, _ = states.shape
    return states.view(batch, length, -1, head_dim).transpose(1, 2)


def merge_heads(mixed: torch.Tensor) -> torch.Tensor:
    """``[B, H, T, D]`` -> ``[B, T, H * D]``."""
    batch, _, length, _ = mixed.shape
    return mixed.transpose(1, 2).reshape(batch, length, -1)


def vision_attention(layer: torch.nn.Module, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer of the vision tower (``Kosmos2VisionEncoderLayer``) up to the middle of its MLP: the attention
    (bidirectional SDPA, as the model's own) with its residual (the new ``hidden``), and the MLP's first
    projection of its normed input (``inner``)."""
    attention = layer.self_attn
    normed = layer.layer_norm1(hidden)
    projections = (attention.q_proj, attention.k_proj, attention.v_proj)
    q, k, v = (split_heads(proj(normed), attention.head_dim) for proj in projections)
    mixed = F.scaled_dot_product_attention(q, k, v, scale=attention.scale)
    hidden = hidden + attention.out_proj(merge_heads(mixed))
    return hidden, layer.mlp.fc1(layer.layer_norm2(hidden))


def vision_mlp_output(mlp: torch.nn.Module, hidden: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The rest of the vision MLP after :func:`vision_attention`, with its residual: the activation (in place;
    one kernel for the quick GELU, Kosmos-2's) and the second projection."""
    quick = isinstance(mlp.activation_fn, QuickGELUActivation)
    return hidden + mlp.fc2(quick_gelu_(inner) if quick else mlp.activation_fn(inner))


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
    its feed-forward block: the attention's sub-layer norm, output projection and residual (the new ``hidden``),
    and the block's first projection of its normed input (``inner``)."""
    attention = layer.self_attn
    hidden = hidden + attention.out_proj(attention.inner_attn_ln(mixed))
    return hidden, layer.ffn.fc1(layer.final_layer_norm(hidden))


def feed_forward_output(ffn: torch.nn.Module, hidden: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """The rest of the feed-forward block (``Kosmos2TextFFN``) after :func:`attention_output`, with its residual:
    activation and inner layer norm (one kernel for the exact GELU, Kosmos-2's), second projection."""
    norm = ffn.ffn_layernorm
    if isinstance(ffn.activation_fn, GELUActivation) and ffn.activation_fn.act is F.gelu:
        middle = gelu_layer_norm(inner, norm.weight, norm.bias, norm.eps)
    else:
        middle = norm(ffn.activation_fn(inner))
    return hidden + ffn.fc2(middle)


@dataclass(frozen=True)
class LayerSteps:
    """The layer functions the fast engine calls, and whether they are compiled."""

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

    return LayerSteps(compiled(vision_attention), compiled(attention_inputs), compiled(attention_output), compiled=True)

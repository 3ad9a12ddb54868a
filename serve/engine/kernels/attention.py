"""The KV cache's kernels: attention for the decode step (one query token per sequence over its slot's cached
keys and values), and the admission's cache writes.

:func:`decode_attention` runs a Triton kernel on CUDA: one program per (row, head) loops over that row's own
length, read from ``lengths`` on the device, with an online softmax in float32. The launch depends only on
the shapes, so it can be captured in a CUDA graph and replayed while the lengths change. Elsewhere (the CPU,
or no Triton) it runs :func:`decode_attention_reference`. Triton is optional; with ``TRITON_INTERPRET=1``
set before this module is imported, the kernel runs in Triton's interpreter on the CPU (for tests).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install: the reference serves
    triton = None

WRITE_BLOCK = 32
"""Prompt positions per program of :func:`write_cache`'s kernel."""

BLOCK_N = 16
"""Cache positions per loop iteration of the kernel."""

NUM_WARPS = 1
"""Warps per (row, head) program: one warp reads a 16x64 fp16 tile per iteration (the fastest on an H200)."""


def triton_available(device: torch.device | str) -> bool:
    """Whether :func:`decode_attention` runs the Triton kernel for tensors on ``device``."""
    if triton is None:
        return False
    return torch.device(device).type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def decode_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Store each row's new key and value at position ``lengths[b] - 1`` of its slot, then attend with its
    query over the slot's first ``lengths[b]`` positions.

    ``query``, ``key`` and ``value`` are ``[B, H, D]``; ``keys`` and ``values`` are ``[S, H, L, D]`` with
    ``S >= B`` (row ``b`` is slot ``b``); ``lengths`` is ``[B]`` integers in ``[1, L]``. Returns ``[B, H, D]``
    in ``query``'s dtype, with the softmax accumulated in float32.
    """
    if not triton_available(query.device):
        return decode_attention_reference(query, key, value, keys, values, lengths, scale)
    batch, heads, head_dim = query.shape
    if head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two, not {head_dim}")
    query = query.contiguous()
    key, value = _one_layout(key, value)
    if any(t.stride(-1) != 1 for t in (key, value, keys, values)):
        raise ValueError("keys and values must be contiguous in their last dimension")
    out = torch.empty_like(query)
    _decode_kernel[(heads, batch)](
        query,
        key,
        value,
        keys,
        values,
        lengths,
        out,
        scale,
        query.stride(0),
        query.stride(1),
        key.stride(0),
        key.stride(1),
        *keys.stride()[:3],
        *values.stride()[:3],
        HEAD_DIM=head_dim,
        BLOCK_N=BLOCK_N,
        num_warps=NUM_WARPS,
    )
    return out


def write_cache(
    keys: torch.Tensor, values: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store ``key`` and ``value`` (``[R, H, W, D]``) as the first ``W`` positions of slots ``slots`` (``[R]``) of
    ``keys`` and ``values`` (``[S, H, L, D]``), as ``keys[slots, :, :W] = key``.

    The Triton kernel copies tiles straight from the projection's strided output; the indexed assignment,
    which it replaces on CUDA, moves about 0.7 TB/s on an H200, a seventh of the memory's bandwidth.
    """
    rows, heads, width, head_dim = key.shape
    if not triton_available(key.device) or head_dim & (head_dim - 1):
        keys[slots, :, :width] = key
        values[slots, :, :width] = value
        return
    key, value = _one_layout(key, value)
    if keys.stride() != values.stride() or key.stride(-1) != 1 or keys.stride(-1) != 1:
        raise ValueError("the cache's keys and values must share a layout, contiguous in their last dimension")
    _write_kernel[(triton.cdiv(width, WRITE_BLOCK), heads, rows)](
        key,
        value,
        keys,
        values,
        slots,
        width,
        *key.stride()[:3],
        *keys.stride()[:3],
        HEAD_DIM=head_dim,
        BLOCK=WRITE_BLOCK,
    )


def _one_layout(key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``key`` and ``value`` with the same strides, which the kernels take once for both (the views of one
    fused projection already have them; otherwise both are made contiguous)."""
    if key.stride() == value.stride():
        return key, value
    return key.contiguous(), value.contiguous()


def decode_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """:func:`decode_attention` as a scatter, then masked SDPA in float32 over the whole cache (no host sync).

    Positions beyond each row's length are zeroed before attending, so nothing there (not even NaN) reaches
    the output.
    """
    batch = query.shape[0]
    rows = torch.arange(batch, device=query.device)
    keys[rows, :, lengths - 1] = key
    values[rows, :, lengths - 1] = value
    positions = torch.arange(keys.shape[2], device=query.device)
    visible = positions[None, :] < lengths[:, None]  # [B, L]
    hidden = ~visible[:, None, :, None]
    k = keys[:batch].float().masked_fill(hidden, 0)
    v = values[:batch].float().masked_fill(hidden, 0)
    mixed = F.scaled_dot_product_attention(
        query[:, :, None].float(), k, v, attn_mask=visible[:, None, None, :], scale=scale
    )
    return mixed[:, :, 0].to(query.dtype)


if triton is not None:

    @triton.jit
    def _decode_kernel(
        q_ptr,
        new_k_ptr,
        new_v_ptr,
        k_ptr,
        v_ptr,
        lengths_ptr,
        out_ptr,
        scale,
        stride_qb,
        stride_qh,
        stride_nb,
        stride_nh,
        stride_ks,
        stride_kh,
        stride_kl,
        stride_vs,
        stride_vh,
        stride_vl,
        HEAD_DIM: tl.constexpr,
        BLOCK_N: tl.constexpr,
    ):
        """One (head, row) program: store the new key and value at ``lengths[row] - 1``, then
        ``out[row, head] = softmax(q k^T * scale) v`` over ``lengths[row]`` positions: the cached ones, then the
        new one from registers (never read back, so the store needs no barrier)."""
        head = tl.program_id(0)
        row = tl.program_id(1).to(tl.int64)  # slot offsets can pass 2**31 elements in a large cache
        cached = tl.load(lengths_ptr + row).to(tl.int32) - 1
        dims = tl.arange(0, HEAD_DIM)
        q_offset = row * stride_qb + head * stride_qh
        q = tl.load(q_ptr + q_offset + dims).to(tl.float32) * scale
        new_offset = row * stride_nb + head * stride_nh  # the new key and value share their strides
        new_k = tl.load(new_k_ptr + new_offset + dims)
        new_v = tl.load(new_v_ptr + new_offset + dims)
        k_base = k_ptr + row * stride_ks + head * stride_kh
        v_base = v_ptr + row * stride_vs + head * stride_vh
        tl.store(k_base + cached * stride_kl + dims, new_k.to(k_ptr.dtype.element_ty))
        tl.store(v_base + cached * stride_vl + dims, new_v.to(v_ptr.dtype.element_ty))
        best = tl.sum(new_k.to(tl.float32) * q, axis=0)  # running maximum of the scores: the new one first
        total = 1.0  # running sum of exp(score - best)
        acc = new_v.to(tl.float32)  # running sum of exp(score - best) * value
        for start in range(0, cached, BLOCK_N):
            positions = start + tl.arange(0, BLOCK_N)
            inside = positions < cached
            k = tl.load(k_base + positions[:, None] * stride_kl + dims[None, :], mask=inside[:, None], other=0.0)
            scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)
            scores = tl.where(inside, scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, axis=0))
            shrink = tl.exp(best - new_best)
            weights = tl.exp(scores - new_best)
            v = tl.load(v_base + positions[:, None] * stride_vl + dims[None, :], mask=inside[:, None], other=0.0)
            acc = acc * shrink + tl.sum(weights[:, None] * v.to(tl.float32), axis=0)
            total = total * shrink + tl.sum(weights, axis=0)
            best = new_best
        tl.store(out_ptr + q_offset + dims, (acc / total).to(out_ptr.dtype.element_ty))

    @triton.jit
    def _write_kernel(
        key_ptr,
        value_ptr,
        keys_ptr,
        values_ptr,
        slots_ptr,
        width,
        stride_r,
        stride_h,
        stride_w,
        stride_s,
        stride_ch,
        stride_l,
        HEAD_DIM: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        """One (position block, head, row) program: copy ``BLOCK`` positions of the row's key and value into its
        slot."""
        head = tl.program_id(1)
        row = tl.program_id(2).to(tl.int64)
        slot = tl.load(slots_ptr + row).to(tl.int64)
        positions = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = (positions < width)[:, None]
        dims = tl.arange(0, HEAD_DIM)[None, :]
        source = row * stride_r + head * stride_h + positions[:, None] * stride_w + dims
        target = slot * stride_s + head * stride_ch + positions[:, None] * stride_l + dims
        key = tl.load(key_ptr + source, mask=inside)
        tl.store(keys_ptr + target, key.to(keys_ptr.dtype.element_ty), mask=inside)
        value = tl.load(value_ptr + source, mask=inside)
        tl.store(values_ptr + target, value.to(values_ptr.dtype.element_ty), mask=inside)

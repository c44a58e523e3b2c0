"""Softmax attention over keys split into parts, each part one fused SDPA call, merged by the
rows' log-sum-exp: no key is copied to put the parts side by side.

For query row i and parts p with outputs o_p and log-sum-exps l_p over their keys (split-KV
flash attention; Dao et al. 2022, "FlashAttention", section 3.1, the softmax of concatenated
blocks; Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory")::

    L_i   = log sum_p exp(l_pi)                 (the log-sum-exp over every part's keys)
    out_i = sum_p exp(l_pi - L_i) o_pi          (the softmax over all the keys, times v)

The backward runs each part's fused backward with the merged L and out in place of its own:
it recomputes the weights as exp(s - L), which are the merged softmax's, and takes
D_i = sum_d dout_id out_id, the merged row's, so each part gets exactly its share of the
gradient of the merged softmax (FlashAttention-2's backward, Dao 2023, Algorithm 2).

A part whose row has no allowed key (``empty``: known from its mask) counts with l = -inf; a
row with no allowed key in any part gives zeros and zero gradients. CPU only (the fused kernel
that returns the log-sum-exp is ``robust_attn._compat.cpu_flash_attention``), no dropout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._compat import cpu_flash_attention, cpu_flash_attention_backward


@dataclass(frozen=True)
class Part:
    """One part: queries (X, Y, R_p, D), keys and values (X, Y, L_p, D), the mask (bool or
    additive, broadcastable to (X, Y, R_p, L_p); None: every key allowed) and ``empty``,
    broadcastable to (X, Y, R_p): rows with no allowed key (None: none). Every part's
    (X, Y, R_p) rows are the same rows, in the same order, reshaped (see
    :func:`merged_attention`)."""

    q: Tensor
    k: Tensor
    v: Tensor
    mask: Tensor | None
    empty: Tensor | None


def additive_mask(allowed: Tensor) -> Tensor:
    """0 where ``allowed``, -inf elsewhere, in the default dtype: the mask SDPA's fused kernels add
    to the scores (they convert a bool mask to it on every call)."""
    return torch.zeros(allowed.shape, dtype=torch.get_default_dtype(),
                       device=allowed.device).masked_fill(~allowed, -math.inf)


def _kernel_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The fused kernel's mask: additive (bool masks become :func:`additive_mask`), in the
    queries' dtype, 4-D (the kernel takes 2-D or 4-D masks only)."""
    if mask is None:
        return None
    mask = additive_mask(mask) if mask.dtype == torch.bool else mask
    return mask.reshape((1,) * (4 - mask.dim()) + mask.shape).to(dtype)


class _Merged(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scale: float, rows: tuple[int, int], masks: tuple, empties: tuple, *qkv: Tensor):
        outs, lses = [], []
        for index, (mask, empty) in enumerate(zip(masks, empties, strict=True)):
            q, k, v = qkv[3 * index:3 * index + 3]
            out, lse = cpu_flash_attention(q, k, v, mask, scale)
            if empty is not None:
                lse = lse.masked_fill(empty, -math.inf)
            outs.append(out.reshape(*rows, out.shape[-1]))
            lses.append(lse.reshape(rows))
        lse = torch.logsumexp(torch.stack(lses), dim=0)
        finite = lse.clamp_min(torch.finfo(lse.dtype).min)  # rows with no key: weights exp(-inf) = 0
        out = sum(torch.exp(part_lse - finite)[..., None].to(part.dtype) * part
                  for part_lse, part in zip(lses, outs, strict=True))
        ctx.scale, ctx.masks = scale, masks
        ctx.save_for_backward(out, finite, *qkv)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        out, lse, *qkv = ctx.saved_tensors
        grads = []
        for index, mask in enumerate(ctx.masks):
            q, k, v = qkv[3 * index:3 * index + 3]
            shape = (*q.shape[:-1], -1)
            grads += cpu_flash_attention_backward(
                grad_out.reshape(shape).contiguous(), q, k, v, out.reshape(shape).contiguous(),
                lse.reshape(q.shape[:-1]).contiguous(), mask, ctx.scale)
        return (None, None, None, None, *grads)


def merged_attention(parts: list[Part], rows: tuple[int, int], scale: float) -> Tensor:
    """(rows[0], rows[1], Dv): softmax attention of the rows over the keys of every part (module
    docstring); each part's outputs, reshaped to ``rows``, are in the same row order."""
    dtype = parts[0].q.dtype
    masks = tuple(_kernel_mask(part.mask, dtype) for part in parts)
    empties = tuple(part.empty for part in parts)
    tensors = [t for part in parts for t in (part.q, part.k, part.v)]
    return _Merged.apply(scale, rows, masks, empties, *tensors)

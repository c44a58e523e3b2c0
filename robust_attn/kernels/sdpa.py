"""PyTorch's fused scaled_dot_product_attention: timm's fused path, softmax attention only.

Two problem shapes are reshaped so that SDPA keeps its fused (flash) kernel
instead of falling back to its math path, which materialises the attention
matrix (measured on the CPU, torch 2.14):

- causal with prepended keys (Nk > Nq: sinks) and no mask: SDPA's ``is_causal``
  is aligned top-left, ours lower-right. Prepending Nk - Nq zero query rows makes
  the two agree (row Nk - Nq + i sees keys j <= Nk - Nq + i); their outputs are
  dropped. Without this the causal mask would be built densely, (Nq, Nk).
- q and k of a different width than v (a sink logit's extra channel): the
  CPU flash kernel needs one width, and CUDA's fused kernels a multiple of 8
  (``CUDA_WIDTH_MULTIPLE``), so the narrower tensors get zero channels, which
  change no score, and the output keeps v's channels.

A sparsity pattern is applied as a dense bool (Nq, Nk) mask: exact, but it
computes every score, so auto uses it for a pattern only where no structured
sparse kernel applies, and warns (robust_attn.kernels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..problem import AttentionProblem
from .base import Kernel

CUDA_WIDTH_MULTIPLE = 8


def _restricted(mask: Tensor | None, allowed: Tensor) -> Tensor:
    """One SDPA mask from a user mask and a bool mask of allowed pairs (causal, pattern)."""
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, -math.inf)


def _fused_widths(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """q, k and v padded with zero channels to one width, on CUDA a multiple of 8 (see the module
    docstring); each one that already has it unchanged (F.pad copies even when it adds nothing:
    a sink logit's q and k, already one channel wider than v, would be copied for nothing)."""
    width = max(q.shape[-1], v.shape[-1])
    if q.device.type == "cuda":
        width = -(-width // CUDA_WIDTH_MULTIPLE) * CUDA_WIDTH_MULTIPLE
    return tuple(t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1])) for t in (q, k, v))


def sdpa_attention(problem: AttentionProblem, dropout_p: float = 0.0) -> Tensor:
    q, mask, is_causal = problem.q, problem.attn_mask, problem.causal
    if problem.pattern is not None:
        mask = _restricted(mask, problem.pattern_allowed())
    prepended = problem.num_keys - problem.num_queries
    if is_causal and mask is None and prepended > 0:
        q = F.pad(q, (0, 0, prepended, 0))  # lower-right causal as SDPA's top-left is_causal
    elif is_causal and (mask is not None or prepended != 0):
        # SDPA's is_causal is aligned top-left and excludes attn_mask: build the mask instead.
        mask, is_causal = _restricted(mask, problem.causal_allowed()), False
    out = F.scaled_dot_product_attention(
        *_fused_widths(q, problem.k, problem.v),
        attn_mask=mask, dropout_p=dropout_p, is_causal=is_causal, scale=problem.scale,
    )
    if out.shape[-2:] == (problem.num_queries, problem.v.shape[-1]):
        return out  # nothing to drop (slicing would add an alias node to the backward)
    return out[..., out.shape[-2] - problem.num_queries:, :problem.v.shape[-1]]


def _unsupported(problem: AttentionProblem, dropout_p: float) -> str | None:
    if problem.score_mods:
        return "SDPA cannot apply score modifiers (softcap, ...): use kernel='flex' or 'chunked'"
    if not problem.is_softmax:
        return "SDPA computes softmax attention only: use kernel='chunked'"
    return None


SDPA = Kernel("sdpa", sdpa_attention, _unsupported,
              no_lse="torch.nn.functional.scaled_dot_product_attention returns no log-sum-exp")

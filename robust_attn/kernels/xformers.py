"""xformers' memory_efficient_attention: used only on CUDA, where it is installed.

xformers has no CPU kernels (0.0.35), so this kernel reports itself unsupported
off CUDA. Its layout is (B, N, H, D); its ``LowerTriangularFromBottomRightMask``
is exactly our lower-right causal alignment.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from einops import rearrange
from torch import Tensor

from ..problem import AttentionProblem
from .base import Kernel


def _attn_bias(problem: AttentionProblem):
    from xformers.ops import fmha

    mask = problem.attn_mask
    if mask is None:
        return fmha.attn_bias.LowerTriangularFromBottomRightMask() if problem.causal else None
    bias = mask if mask.dtype != torch.bool else \
        torch.zeros(mask.shape, dtype=problem.q.dtype, device=mask.device).masked_fill(~mask, -math.inf)
    if problem.causal:
        bias = bias.masked_fill(~problem.causal_allowed(), -math.inf)
    batch, heads = problem.q.shape[:2]
    return bias.to(problem.q.dtype).expand(batch, heads, problem.num_queries, problem.num_keys)


def xformers_attention(problem: AttentionProblem, dropout_p: float = 0.0) -> Tensor:
    from xformers.ops import memory_efficient_attention

    q, k, v = (rearrange(t, "b h n d -> b n h d") for t in (problem.q, problem.k, problem.v))
    out = memory_efficient_attention(q, k, v, attn_bias=_attn_bias(problem), p=dropout_p,
                                     scale=problem.scale)
    return rearrange(out, "b n h d -> b h n d")


def _unsupported(problem: AttentionProblem, dropout_p: float) -> str | None:
    if importlib.util.find_spec("xformers") is None:
        return "xformers is not installed: pip install 'robust-attn[xformers]'"
    if problem.q.device.type != "cuda":
        return "xformers has no CPU kernels: it runs on CUDA tensors only"
    if problem.score_mods or not problem.is_softmax:
        return "xformers computes plain softmax attention: use kernel='flex' or 'chunked'"
    if problem.pattern is not None:
        return ("xformers does not apply sparsity patterns here: use kernel='flex' or a "
                "structured sparse kernel")
    return None


XFORMERS = Kernel("xformers", xformers_attention, _unsupported)

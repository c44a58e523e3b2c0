"""xformers' memory_efficient_attention: used only on CUDA, where it is installed, and only when chosen.

xformers has no CPU kernels (0.0.35), so this kernel reports itself unsupported
off CUDA. Its layout is (B, N, H, D); its ``LowerTriangularFromBottomRightMask``
is exactly our lower-right causal alignment.

``auto`` never picks it: SDPA accepts every problem it accepts and comes first,
and for the problems both run, xformers' CUTLASS operator calls the same kernel
as SDPA's memory-efficient backend (xformers/ops/fmha/cutlass.py: ``OPERATOR =
aten._efficient_attention_forward``). It runs when chosen (``kernel='xformers'``),
for comparisons and for users who standardise on xformers.

Alignment (xformers/ops/fmha/common.py ``check_lastdim_alignment_stride1``,
cutlass.py ``_minimum_gemm_alignment`` and ``_check_bias_alignment``, flash.py;
xformers 0.0.35): on sm80 and later, query, key and value widths must be multiples
of 8 (16-bit) or 4 (float32), and every stride of a tensor bias except the last a
multiple of 128 / bits (8 or 4), otherwise no operator accepts the inputs ("No
operator found"); flash and cutlass_blackwell also need q and v of one width
(``SUPPORTS_DIFFERENT_VALUE_EMBED = False``), and cutlass stops at sm90. So q, k
and v get zero channels up to one width, a multiple of that (zero channels change
no score; the output keeps v's channels: a sink logit's 65-wide q and k and
64-wide v all become 72), and a tensor bias is written into a buffer whose rows are
padded to that multiple and sliced back (:func:`aligned_bias`), as xformers'
own hint suggests (``torch.zeros([1, 1, 5, 8])[:, :, :, :5]``).
"""

from __future__ import annotations

import importlib.util
import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..problem import AttentionProblem
from .base import Kernel

DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # cutlass.py FwOp.SUPPORTED_DTYPES


def alignment(dtype: torch.dtype) -> int:
    """Elements per 128 bits: the multiple xformers needs for widths and bias strides (8 for
    16-bit floats, 4 for float32)."""
    return 128 // torch.finfo(dtype).bits


def aligned_bias(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised tensor of ``shape`` whose strides, all but the last, are multiples of
    :func:`alignment`: the last dimension is allocated rounded up and sliced back."""
    multiple = alignment(dtype)
    padded = -(-shape[-1] // multiple) * multiple
    return torch.empty(*shape[:-1], padded, dtype=dtype, device=device)[..., :shape[-1]]


def _attn_bias(problem: AttentionProblem):
    from xformers.ops import fmha

    mask = problem.attn_mask
    if mask is None:
        return fmha.attn_bias.LowerTriangularFromBottomRightMask() if problem.causal else None
    dtype = problem.q.dtype
    rows = problem.num_queries if problem.causal else mask.shape[-2]
    bias = aligned_bias((*mask.shape[:2], rows, problem.num_keys), dtype, mask.device)
    if mask.dtype == torch.bool:
        bias.zero_().masked_fill_(~mask, -math.inf)
    else:
        bias.copy_(mask.expand(bias.shape))
    if problem.causal:
        bias.masked_fill_(~problem.causal_allowed(), -math.inf)
    batch, heads = problem.q.shape[:2]
    return bias.expand(batch, heads, problem.num_queries, problem.num_keys)


def _aligned_widths(problem: AttentionProblem) -> tuple[Tensor, Tensor, Tensor]:
    """q, k and v with zero channels up to one width, a multiple of :func:`alignment`."""
    multiple = alignment(problem.q.dtype)
    width = -(-max(problem.q.shape[-1], problem.v.shape[-1]) // multiple) * multiple
    return tuple(t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))
                 for t in (problem.q, problem.k, problem.v))


def xformers_attention(problem: AttentionProblem, dropout_p: float = 0.0) -> Tensor:
    from xformers.ops import memory_efficient_attention

    q, k, v = (rearrange(t, "b h n d -> b n h d") for t in _aligned_widths(problem))
    out = memory_efficient_attention(q, k, v, attn_bias=_attn_bias(problem), p=dropout_p,
                                     scale=problem.scale)
    return rearrange(out[..., :problem.v.shape[-1]], "b n h d -> b h n d")


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
    if problem.q.dtype not in DTYPES:
        return (f"xformers computes float32, float16 and bfloat16 only, not {problem.q.dtype}: "
                f"use kernel='sdpa'")
    return None


XFORMERS = Kernel("xformers", xformers_attention, _unsupported)

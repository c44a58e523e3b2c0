"""Strided attention by permuting each residue class mod the stride into a contiguous block.

For ``Strided(stride)`` (optionally causal) query i attends key j when
i = j (mod stride): the classes {c, c + stride, c + 2 stride, ...} attend
within themselves. With N = m * stride + r, the first m * stride tokens
viewed as (m, stride) and transposed give each class as a row of m tokens in
token order; the r tail tokens are the (m + 1)-th members of classes 0..r-1.
So the classes are two groups of equal length (r of m + 1 tokens, stride - r
of m tokens), one SDPA call each with no mask. Work: N^2 / stride scores.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..problem import AttentionProblem
from ..sparse import Strided, split_causal
from .base import Kernel
from .structured import attend_within_groups, structured_unsupported


def _split(stride: int):
    def split(x: Tensor) -> list[Tensor]:
        num_tokens = x.shape[2]
        whole, rest = num_tokens // stride * stride, num_tokens % stride
        classes = x[:, :, :whole].unflatten(2, (-1, stride)).transpose(2, 3)  # (B, H, stride, m, D)
        tails = x[:, :, whole:].unsqueeze(3)  # (B, H, rest, 1, D)
        return [torch.cat([classes[:, :, :rest], tails], dim=3), classes[:, :, rest:]]

    return split


def _merge(outs: list[Tensor]) -> Tensor:
    longer, shorter = outs
    members = shorter.shape[3]  # m
    classes = torch.cat([longer[:, :, :, :members], shorter], dim=2)  # (B, H, stride, m, Dv)
    return torch.cat([classes.transpose(2, 3).flatten(2, 3), longer[:, :, :, members]], dim=2)


def strided_attention(problem: AttentionProblem, dropout_p: float = 0.0) -> Tensor:
    pattern, causal = split_causal(problem.pattern)
    return attend_within_groups(problem, dropout_p, causal or problem.causal,
                                _split(pattern.stride), _merge)


def _unsupported(problem: AttentionProblem, dropout_p: float) -> str | None:
    reason = structured_unsupported(problem)
    if reason is not None:
        return reason
    if not isinstance(split_causal(problem.pattern)[0], Strided):
        return "the strided kernel runs Strided patterns (optionally causal) only"
    if problem.num_keys != problem.num_queries:
        return "the strided kernel needs Nk == Nq (no prepended keys)"
    return None


STRIDED = Kernel("strided", strided_attention, _unsupported)

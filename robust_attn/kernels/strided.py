"""Strided attention by permuting each residue class mod the stride into a contiguous block.

For ``Strided(stride)`` (optionally causal) query i attends key j when
i = j (mod stride): the classes {c, c + stride, c + 2 stride, ...} attend
within themselves. With N = m * stride + r, the first m * stride tokens
viewed as (m, stride) and transposed give each class as a row of m tokens in
token order; the r tail tokens are the (m + 1)-th members of classes 0..r-1.
So the classes are two groups of equal length (r of m + 1 tokens, stride - r
of m tokens), one SDPA call each with no mask. Work: N^2 / stride scores.

Under torch.compile that split makes dynamo specialise on r (one graph per
residue, and the recompile limit of 8 is hit over varying lengths), so traced
code pads q, k and v at the end to (m + 1) * stride tokens instead and blocks
the padded keys (and, when causal, later keys) with a (stride, m + 1, m + 1)
bool mask: one SDPA call whose sizes are functions of N without a case on r,
so the length stays a symbol. Padded queries attend their own (padded) key, so
no row is empty, and their outputs are dropped. Eager mode keeps the split:
the mask costs SDPA its fastest path (measured: 3x slower at N = 4099, H = 6,
D = 64 on the CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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


def _classes(x: Tensor, stride: int, padding: int) -> Tensor:
    """(B, H, N, D) -> (B * H, stride, m', D): each residue class in token order, padded."""
    x = F.pad(x, (0, 0, 0, padding)) if padding else x
    return x.flatten(0, 1).unflatten(1, (-1, stride)).transpose(1, 2)


def _class_mask(num_tokens: int, stride: int, members: int, causal: bool,
                device: torch.device) -> Tensor:
    """(stride, m', m') bool: key j of a class is allowed to query i of it when j is a token
    (not padding) and, if causal, j <= i; i's own position is always allowed."""
    position = torch.arange(members * stride, device=device).view(members, stride).T
    index = torch.arange(members, device=device)
    allowed = (position < num_tokens)[:, None, :]
    if causal:
        allowed = allowed & (index[None, :] <= index[:, None])
    return allowed | (index[:, None] == index[None, :])


def strided_attention(problem: AttentionProblem, dropout_p: float = 0.0,
                      padded: bool | None = None) -> Tensor:
    """``padded``: the padded single call (default: under torch.compile) or the split."""
    pattern, causal = split_causal(problem.pattern)
    causal = causal or problem.causal
    if not (torch.compiler.is_compiling() if padded is None else padded):
        return attend_within_groups(problem, dropout_p, causal, _split(pattern.stride), _merge)
    stride = pattern.stride
    batch, heads, num_tokens = problem.q.shape[:3]
    padding = (-num_tokens) % stride
    q, k, v = (_classes(t, stride, padding) for t in (problem.q, problem.k, problem.v))
    if padding:
        mask = _class_mask(num_tokens, stride, q.shape[2], causal, q.device)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                             scale=problem.scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal,
                                             scale=problem.scale)
    out = out.transpose(1, 2).flatten(1, 2)[:, :num_tokens]  # (B * H, N, Dv) in token order
    return out.unflatten(0, (batch, heads))


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

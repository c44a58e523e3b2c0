"""Strided attention by permuting each residue class mod the stride into a contiguous block.

For ``Strided(stride)`` (optionally causal) query i attends key j when
i = j (mod stride): the classes {c, c + stride, c + 2 stride, ...} attend
within themselves. With N = m * stride exactly, the tokens viewed as
(m, stride) and transposed give each class as a row of m tokens in token
order: one SDPA call over the stride classes, with no mask. Work: N^2 / stride
scores.

Otherwise (N = m * stride + r, 0 < r < stride) q, k and v are padded at the
end to (m + 1) * stride tokens and a (stride, m + 1, m + 1) bool mask blocks
the padded keys (and, when causal, later keys): still one SDPA call. The
padding, not a split into classes of m + 1 and m tokens, keeps every size a
function of N without a case on r, so ``torch.compile`` traces the length as a
symbol (a split makes dynamo specialise on r, one graph per residue). Padded
queries attend their own (padded) key, so no row of the call is empty, and
their outputs are dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..problem import AttentionProblem
from ..sparse import Strided, split_causal
from .base import Kernel
from .structured import structured_unsupported


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


def strided_attention(problem: AttentionProblem, dropout_p: float = 0.0) -> Tensor:
    pattern, causal = split_causal(problem.pattern)
    causal = causal or problem.causal
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

"""What the structured sparse kernels share: the problems they take, and attention within groups.

The structured kernels (block_diagonal, strided, block_sparse) compute a
sparsity pattern exactly with SDPA on rearranged tokens, skipping the
blocked work, and stay differentiable (every rearrangement is a view, a
reshape, a cat or an index_select), so they train on the CPU where
FlexAttention has no backward. They take softmax problems with a pattern
and no user mask or score modifier; anything else goes to flex, sdpa or eager.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

from ..problem import AttentionProblem

# (B, H, N, D) -> groups of tokens, each (B, H, G, L, D): G groups of L tokens.
Split = Callable[[Tensor], list[Tensor]]
# The groups' outputs -> (B, H, N, Dv) in token order.
Merge = Callable[[list[Tensor]], Tensor]


def structured_unsupported(problem: AttentionProblem) -> str | None:
    """Why no structured sparse kernel can run the problem (apart from its pattern's shape)."""
    if problem.pattern is None:
        return "no sparsity pattern to exploit"
    if problem.attn_mask is not None:
        return "structured sparse kernels take no attn_mask besides the pattern"
    if problem.score_mods:
        return "structured sparse kernels are built on SDPA, which has no score modifiers"
    if not problem.is_softmax:
        return "structured sparse kernels compute softmax attention only"
    return None


def _group_sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float,
                dropout_p: float) -> Tensor:
    """(B, H, G, L, D) groups attending within themselves -> (B, H, G, L, Dv)."""
    batch, heads, groups, length, _ = q.shape
    if q.numel() == 0:
        return v.new_empty(batch, heads, groups, length, v.shape[-1])
    out = F.scaled_dot_product_attention(
        q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1),
        dropout_p=dropout_p, is_causal=causal, scale=scale,
    )
    return out.unflatten(0, (batch, heads))


def attend_within_groups(problem: AttentionProblem, dropout_p: float, causal: bool,
                         split: Split, merge: Merge) -> Tensor:
    """Each group of tokens attends only within itself (causally in token order when ``causal``;
    ``split`` must keep token order inside a group). One SDPA call per group length."""
    groups = zip(*(split(t) for t in (problem.q, problem.k, problem.v)), strict=True)
    outs = [_group_sdpa(q, k, v, causal, problem.scale, dropout_p) for q, k, v in groups]
    return merge(outs)

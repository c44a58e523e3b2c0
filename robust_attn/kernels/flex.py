"""FlexAttention: score modifiers and block-sparse masks without materialising the attention matrix.

The problem's score_mods and the finite part of its float mask (as
``score + bias[b, h, q, kv]``) become one score_mod; every blocked key (bool
False, float -inf, causal) goes into a mask_mod compiled into a BlockMask, so
a query with no allowed key returns zeros. Both are handed to
``torch.nn.attention.flex_attention``. Causal BlockMasks are cached per
(Nq, Nk, device); a dense bool mask is rebuilt on each call since its content
can change.

On the CPU, FlexAttention runs forward only (its backward raises
NotImplementedError), so it is never chosen there when gradients are needed.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..problem import AttentionProblem, ScoreMod
from .base import Kernel


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _expanded(mask: Tensor, problem: AttentionProblem) -> Tensor:
    batch, heads = problem.q.shape[:2]
    return mask.expand(batch, heads, problem.num_queries, problem.num_keys)


def _score_mod(problem: AttentionProblem) -> ScoreMod | None:
    mods = problem.score_mods
    mask = problem.attn_mask
    bias = _expanded(mask, problem) if mask is not None and mask.dtype != torch.bool else None
    if not mods and bias is None:
        return None

    def score_mod(score, b, h, q_idx, kv_idx):
        for mod in mods:
            score = mod(score, b, h, q_idx, kv_idx)
        if bias is None:
            return score
        # Blocked (-inf) entries are left to the BlockMask; adding them here too would
        # turn a row with no allowed key into nan instead of zeros.
        added = bias[b, h, q_idx, kv_idx]
        return score + torch.where(added > -math.inf, added, 0.0)

    return score_mod


@functools.lru_cache(maxsize=32)
def _causal_block_mask(num_queries: int, num_keys: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    offset = num_keys - num_queries

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + offset

    return create_block_mask(causal, None, None, num_queries, num_keys, device=device)


def _block_mask(problem: AttentionProblem):
    """Blocked keys (bool False, float -inf, causal) as a BlockMask, so blocked rows give zeros."""
    mask = problem.attn_mask
    if mask is None:
        return _causal_block_mask(problem.num_queries, problem.num_keys, problem.q.device) \
            if problem.causal else None
    from torch.nn.attention.flex_attention import create_block_mask

    keep = _expanded(mask if mask.dtype == torch.bool else mask > -math.inf, problem)
    offset = problem.num_keys - problem.num_queries
    causal = problem.causal

    def allowed(b, h, q_idx, kv_idx):
        allowed_here = keep[b, h, q_idx, kv_idx]
        return allowed_here & (kv_idx <= q_idx + offset) if causal else allowed_here

    batch, heads = problem.q.shape[:2]
    return create_block_mask(allowed, batch, heads, problem.num_queries, problem.num_keys,
                             device=problem.q.device)


def flex_attention(problem: AttentionProblem, dropout_p: float = 0.0) -> Tensor:
    return _compiled_flex_attention()(
        problem.q, problem.k, problem.v,
        score_mod=_score_mod(problem), block_mask=_block_mask(problem), scale=problem.scale,
    )


def _unsupported(problem: AttentionProblem, dropout_p: float) -> str | None:
    if not problem.is_softmax:
        return "FlexAttention computes softmax attention only: use kernel='eager'"
    if dropout_p > 0.0:
        return "FlexAttention has no attention dropout: use kernel='sdpa' or 'eager', or attn_drop=0"
    if problem.q.device.type == "cpu" and problem.needs_grad:
        return ("FlexAttention on the CPU runs forward only (its backward raises "
                "NotImplementedError): use kernel='sdpa' or 'eager' to train on the CPU")
    return None


FLEX = Kernel("flex", flex_attention, _unsupported)

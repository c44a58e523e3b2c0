"""FlexAttention: score modifiers and block-sparse masks without materialising the attention matrix.

The problem's score_mods and the finite part of its float mask (as
``score + bias[b, h, q, kv]``) become one score_mod; every blocked key (bool
False, float -inf, causal) goes into a mask_mod compiled into a BlockMask, so
a query with no allowed key returns zeros. Both are handed to
``torch.nn.attention.flex_attention``. The BlockMask of the causal mask and
the sparsity pattern is built once per (pattern, causal, Nq, Nk, device) and
cached, so a new length builds a new one and never reuses a stale one; with a
dense bool mask it is rebuilt on each call since the mask's content can change.

On the CPU, FlexAttention runs forward only (its backward raises
NotImplementedError) and compiles once per sequence length, so ``auto`` does
not choose it there without a sparsity pattern (robust_attn.kernels); it
refuses problems that need gradients. Head widths are rounded up to a power of
two inside FlexAttention (a sink logit's extra channel makes 64 + 1 cost 128).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from ..problem import AttentionProblem, ScoreMod
from ..sparse.pattern import Pattern, structural_mask_mod
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
def _structural_block_mask(pattern: Pattern | None, causal: bool, num_queries: int,
                           num_keys: int, device: torch.device):
    """The BlockMask of the causal mask and the pattern, once per (pattern, causal, lengths, device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = structural_mask_mod(pattern, causal, num_queries, num_keys)
    return create_block_mask(mask_mod, None, None, num_queries, num_keys, device=device)


def _block_mask(problem: AttentionProblem):
    """Blocked keys (bool False, float -inf, causal, pattern) as a BlockMask, so blocked rows
    give zeros."""
    mask = problem.attn_mask
    if mask is None:
        if not problem.causal and problem.pattern is None:
            return None
        return _structural_block_mask(problem.pattern, problem.causal, problem.num_queries,
                                      problem.num_keys, problem.q.device)
    from torch.nn.attention.flex_attention import create_block_mask

    keep = _expanded(mask if mask.dtype == torch.bool else mask > -math.inf, problem)
    structure = structural_mask_mod(problem.pattern, problem.causal, problem.num_queries,
                                    problem.num_keys)

    def allowed(b, h, q_idx, kv_idx):
        allowed_here = keep[b, h, q_idx, kv_idx]
        return allowed_here if structure is None else allowed_here & structure(b, h, q_idx, kv_idx)

    batch, heads = problem.q.shape[:2]
    return create_block_mask(allowed, batch, heads, problem.num_queries, problem.num_keys,
                             device=problem.q.device)


def flex_attention(problem: AttentionProblem, dropout_p: float = 0.0) -> Tensor:
    return _compiled_flex_attention()(
        problem.q, problem.k, problem.v,
        score_mod=_score_mod(problem), block_mask=_block_mask(problem), scale=problem.scale,
    )


_CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _unsupported(problem: AttentionProblem, dropout_p: float) -> str | None:
    if not problem.is_softmax:
        return "FlexAttention computes softmax attention only: use kernel='chunked'"
    if dropout_p > 0.0:
        return "FlexAttention has no attention dropout: use kernel='sdpa' or 'chunked', or attn_drop=0"
    if problem.q.device.type == "cpu" and problem.q.dtype not in _CPU_DTYPES:
        return (f"FlexAttention on the CPU computes float32, float16 and bfloat16 only, "
                f"not {problem.q.dtype}: use kernel='sdpa' or 'chunked'")
    if problem.q.device.type == "cpu" and problem.needs_grad:
        return ("FlexAttention on the CPU runs forward only (its backward raises "
                "NotImplementedError): use kernel='sdpa' or 'chunked' to train on the CPU")
    return None


FLEX = Kernel("flex", flex_attention, _unsupported)

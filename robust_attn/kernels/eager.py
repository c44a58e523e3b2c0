"""The eager kernel: materialises the attention matrix; the reference every other kernel is tested against.

    S = score_mods(scale * Q K^T) + bias, blocked keys at -inf;  A = normalizer(S);  out = A V

Blocked keys: the mask's False / -inf entries, causal, and the sparsity
pattern, which is applied here as a dense (Nq, Nk) mask.

The health probe calls :func:`attention_logits` on a subsample of query rows,
so what it measures is what the kernels compute.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..problem import AttentionProblem
from .base import Kernel


def _index_grid(batch: int, heads: int, rows: Tensor, keys: int) -> tuple[Tensor, ...]:
    """FlexAttention's (b, h, q_idx, kv_idx) as broadcastable (B, H, Nq, Nk) index tensors."""
    device = rows.device
    return (
        torch.arange(batch, device=device).view(-1, 1, 1, 1),
        torch.arange(heads, device=device).view(1, -1, 1, 1),
        rows.view(1, 1, -1, 1),
        torch.arange(keys, device=device).view(1, 1, 1, -1),
    )


def scaled_scores(problem: AttentionProblem, query_index: Tensor | None = None) -> Tensor:
    """scale * q k^T (B, H, Nq', Nk) for the given query rows (all when None)."""
    q = problem.q if query_index is None else problem.q[:, :, query_index]
    return (q * problem.scale) @ problem.k.transpose(-2, -1)


def masked_logits(problem: AttentionProblem, scores: Tensor,
                  query_index: Tensor | None = None) -> Tensor:
    """The score modifiers, the mask, causal and the pattern applied to ``scores`` = scale q k^T of
    the given query rows (all when None): the logits, -inf where blocked."""
    if problem.score_mods:
        grid = _index_grid(scores.shape[0], scores.shape[1], problem.query_index(query_index),
                           problem.num_keys)
        for score_mod in problem.score_mods:
            scores = score_mod(scores, *grid)
    mask = problem.attn_mask
    if mask is not None:
        if query_index is not None and mask.shape[-2] != 1:
            mask = mask[..., query_index, :]
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
    for allowed in (problem.causal_allowed(query_index), problem.pattern_allowed(query_index)):
        if allowed is not None:
            scores = scores.masked_fill(~allowed, -math.inf)
    return scores


def attention_logits(problem: AttentionProblem, query_index: Tensor | None = None) -> Tensor:
    """Masked logits (B, H, Nq', Nk) for the given query rows (all when None); -inf = blocked."""
    return masked_logits(problem, scaled_scores(problem, query_index), query_index)


def attention_weights(problem: AttentionProblem, query_index: Tensor | None = None) -> Tensor:
    """Attention weights (B, H, Nq', Nk): :meth:`AttentionProblem.normalize` of :func:`attention_logits`."""
    return problem.normalize(attention_logits(problem, query_index))


def eager_attention(problem: AttentionProblem, dropout_p: float = 0.0) -> Tensor:
    weights = attention_weights(problem)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ problem.v


EAGER = Kernel("eager", eager_attention, lambda problem, dropout_p: None)

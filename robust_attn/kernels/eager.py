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


def _index_grid(batch: int, heads: int, rows: Tensor, keys: Tensor) -> tuple[Tensor, ...]:
    """FlexAttention's (b, h, q_idx, kv_idx) as broadcastable (B, H, Nq', Nk') index tensors."""
    device = rows.device
    return (
        torch.arange(batch, device=device).view(-1, 1, 1, 1),
        torch.arange(heads, device=device).view(1, -1, 1, 1),
        rows.view(1, 1, -1, 1),
        keys.view(1, 1, 1, -1),
    )


def with_contiguous_heads(problem: AttentionProblem) -> AttentionProblem:
    """The problem with q, k and v contiguous (one copy each, where they are not).

    q, k and v arrive as views into the qkv projection's output ((B, N, 3, H, D) memory, so a
    head's rows are 3 C apart): a batched matmul cannot fold such a view's (B, H) dimensions into
    one (when both exceed 1) and copies it at every product, forward and backward, and in the
    chunked kernel once per block of rows. Measured on the CPU (one thread): softcap's training
    step 6-8 % faster at ViT-S (B=8), 14 % (softcap) and 20 % (sigmoid) at the LM shape."""
    return problem.with_(q=problem.q.contiguous(), k=problem.k.contiguous(),
                         v=problem.v.contiguous())


def scaled_scores(problem: AttentionProblem, query_index: Tensor | None = None) -> Tensor:
    """scale * q k^T (B, H, Nq', Nk) for the given query rows (all when None)."""
    q = problem.q if query_index is None else problem.q[:, :, query_index]
    return (q * problem.scale) @ problem.k.transpose(-2, -1)


def masked_logits(problem: AttentionProblem, scores: Tensor, query_index: Tensor | None = None,
                  key_index: Tensor | None = None) -> Tensor:
    """The score modifiers, the mask, causal, the pattern and the block selection applied to
    ``scores`` = scale q k^T of the given query rows and keys (all when None): the logits, -inf
    where blocked."""
    score_mod = problem.score_mod()
    if score_mod is not None:
        scores = score_mod(scores, *_index_grid(scores.shape[0], scores.shape[1],
                                                problem.query_index(query_index),
                                                problem.key_index(key_index)))
    mask = problem.attn_mask
    if mask is not None:
        if query_index is not None and mask.shape[-2] != 1:
            mask = mask[..., query_index, :]
        if key_index is not None and mask.shape[-1] != 1:
            mask = mask[..., key_index]
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask
    for allowed in (problem.causal_allowed(query_index, key_index),
                    problem.pattern_allowed(query_index, key_index),
                    problem.selection_allowed(query_index, key_index)):
        if allowed is not None:
            scores = scores.masked_fill(~allowed, -math.inf)
    return scores


def attention_logits(problem: AttentionProblem, query_index: Tensor | None = None) -> Tensor:
    """Masked logits (B, H, Nq', Nk) for the given query rows (all when None); -inf = blocked.
    Sink logits count as the key they stand for (:meth:`AttentionProblem.with_sink_as_key`)."""
    problem = problem.with_sink_as_key()
    return masked_logits(problem, scaled_scores(problem, query_index), query_index)


def attention_weights(problem: AttentionProblem, query_index: Tensor | None = None) -> Tensor:
    """Attention weights (B, H, Nq', Nk): :meth:`AttentionProblem.normalize` of :func:`attention_logits`."""
    return problem.normalize(attention_logits(problem, query_index))


def row_logsumexp(logits: Tensor) -> Tensor:
    """log sum_j exp(s_ij) per row of masked ``logits`` (..., Nq, Nk), in float32; -inf for a row
    with no allowed key (torch.logsumexp gives that for an all -inf row)."""
    return torch.logsumexp(logits.detach().float(), dim=-1)


def eager_attention(problem: AttentionProblem, dropout_p: float = 0.0) -> Tensor:
    return eager_attention_with_lse(problem, dropout_p, lse=False)[0]


def eager_attention_with_lse(problem: AttentionProblem, dropout_p: float = 0.0,
                             lse: bool = True) -> tuple[Tensor, Tensor | None]:
    """The output and, when ``lse``, each row's log-sum-exp, from one materialised score matrix."""
    problem = with_contiguous_heads(problem)
    logits = attention_logits(problem)
    weights = problem.normalize(logits)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ problem.v, row_logsumexp(logits) if lse else None


EAGER = Kernel("eager", eager_attention, lambda problem, dropout_p: None,
               run_with_lse=eager_attention_with_lse)

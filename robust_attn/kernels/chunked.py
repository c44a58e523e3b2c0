"""The chunked kernel: the eager computation over blocks of query rows, so memory stays bounded.

For each block R of consecutive query rows (:func:`robust_attn.kernels.eager.attention_logits`
handles the rows' mask, causal, pattern and score-modifier indices)::

    S_R = score_mods(scale * Q_R K^T) + bias_R   (blocked keys at -inf)
    out_R = dropout(normalizer(S_R)) V

Every normalizer acts on each row on its own (softmax, sigmoid: see
:class:`robust_attn.problem.AttentionProblem`), so the blocks' outputs, stacked,
are the eager kernel's output: the same operations on the same numbers.

With gradients enabled, the blocks are recomputed during the backward pass
instead of being kept, so that at most one block's scores and weights are alive
at a time, forward and backward; the price is a second forward pass per block.
Two ways:

- q, k and v are all that need gradients (every preset): a custom autograd
  function computes each block's gradients from its recomputed weights P and
  adds them in place, with dP = g V^T, dS from autograd through the score
  modifiers, mask and normalizer, then dV += P^T g, dQ_R = scale dS K and
  dK += scale dS^T Q_R (the chain rule of out = P V, S = scale Q K^T);
- otherwise (a float mask or a score modifier's captured tensor needs
  gradients), each block runs under ``torch.utils.checkpoint``, which routes
  every gradient but allocates a full-size gradient of k and v per block
  while it runs.

Both restore the random number generator's state before recomputing, so
dropout draws the forward pass's masks.

The rule for the block size (:func:`rows_per_block`), relative to the size of
q, so that the blocks' memory stays a fixed share of the activations that any
kernel keeps (q, k, v, the output and their gradients):

- the whole score matrix has at most ``WHOLE_MATRIX_SCORES_PER_Q = 4`` score
  elements per element of q (B H Nq Nk <= 4 B H Nq D, i.e. Nk <= 4 D: a ViT at
  224 px has 197 keys per 64-wide head): one block, no recompute, exactly the
  eager kernel and its speed;
- longer: blocks of ``BLOCK_SCORES_PER_Q = 1/8`` score elements per element of
  q (at least one row): for B = 1, H = 8, D = 64 and Nq = Nk = 16384, 8-row
  blocks of 1 M scores (4 MiB in float32) each.

Under torch.compile the kernel runs as one block (the eager kernel): a graph would unroll
every block, and dynamo cannot trace the recomputing backward's RNG fork. A compiled module
on the CPU therefore materialises the score matrix (inductor fuses its elementwise passes);
on CUDA, auto picks FlexAttention for these problems instead.

Causal softmax problems without a sparsity pattern skip the keys that no query
of a block may see (:func:`causal_prefix`): a block of early rows computes a
short score matrix, so causal attention costs about half the work of the full
matrix. Score modifiers still see every key at its own index.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..problem import AttentionProblem
from .base import Kernel
from .eager import (
    attention_logits,
    eager_attention,
    masked_logits,
    row_logsumexp,
    scaled_scores,
    with_contiguous_heads,
)

WHOLE_MATRIX_SCORES_PER_Q = 4
BLOCK_SCORES_PER_Q = 1 / 8


def rows_per_block(problem: AttentionProblem) -> int:
    """Query rows per block: all of them when the whole score matrix is small, else a block of
    about BLOCK_SCORES_PER_Q score elements per element of q (module docstring)."""
    batch, heads, num_queries = problem.q.shape[:3]
    scores_per_row = batch * heads * problem.num_keys
    if num_queries * scores_per_row <= WHOLE_MATRIX_SCORES_PER_Q * problem.q.numel():
        return max(num_queries, 1)
    return max(1, math.floor(BLOCK_SCORES_PER_Q * problem.q.numel() / scores_per_row))


def _block_weights(problem: AttentionProblem, scores: Tensor, rows: Tensor,
                   dropout_p: float) -> Tensor:
    """dropout(normalizer(masked logits)) of the rows' scores scale Q_R K^T."""
    weights = problem.normalize(masked_logits(problem, scores, rows))
    return F.dropout(weights, p=dropout_p) if dropout_p > 0.0 else weights


def _block_output(problem: AttentionProblem, rows: Tensor, dropout_p: float) -> Tensor:
    """dropout(normalizer(S_R)) V for the query rows ``rows``."""
    return _block_weights(problem, scaled_scores(problem, rows), rows, dropout_p) @ problem.v


def _sliced_mask(mask: Tensor | None, num_queries: int, num_keys: int) -> Tensor | None:
    """The mask's first rows and columns (a broadcast dimension of size 1 stays)."""
    if mask is None:
        return None
    if mask.dim() >= 2:
        mask = mask[..., :num_queries, :]
    return mask[..., :num_keys]


def causal_prefix(problem: AttentionProblem, last_row: int) -> AttentionProblem:
    """The problem cut to query rows 0..last_row and the keys they may see, for causal softmax.

    Query row i sees key j when j <= i + (Nk - Nq): keeping the first last_row + 1 queries and
    last_row + 1 + (Nk - Nq) keys keeps that offset, every index (score modifiers see the same
    q_idx, kv_idx) and every allowed pair of those rows. Dropped keys had weight exp(-inf) = 0,
    so softmax rows are unchanged; other normalizers (sigmoid's bias depends on Nk) and
    patterns (aligned to the lengths) get the problem unchanged, and so do rows that see no key.
    """
    if not problem.causal or not problem.is_softmax or problem.pattern is not None:
        return problem
    num_queries = last_row + 1
    num_keys = num_queries + problem.num_keys - problem.num_queries
    if num_keys < 1 or num_queries == problem.num_queries:  # no key to keep (the rows are empty)
        return problem
    return problem.with_(q=problem.q[:, :, :num_queries], k=problem.k[:, :, :num_keys],
                         v=problem.v[:, :, :num_keys],
                         attn_mask=_sliced_mask(problem.attn_mask, num_queries, num_keys))


def _rng_state(device: torch.device) -> tuple:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _restore_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _add_product(total: Tensor, keys: int, left: Tensor, right: Tensor) -> None:
    """total[:, :, :keys] += left @ right, in place ((B, H) flattened into one batch dimension),
    so no temporary as large as ``total`` is made."""
    batch = total.shape[0] * total.shape[1]
    total.view(batch, *total.shape[2:])[:, :keys].baddbmm_(left.reshape(batch, *left.shape[2:]),
                                                           right.reshape(batch, *right.shape[2:]))


class _RecomputedBlocks(torch.autograd.Function):
    """out = blockwise attention of (q, k, v); backward recomputes each block and adds its
    gradients in place (module docstring), in the forward's block order and random state."""

    @staticmethod
    def forward(ctx, q, k, v, problem, blocks, dropout_p):
        problem = problem.with_(q=q, k=k, v=v)
        ctx.rng_state = _rng_state(q.device) if dropout_p > 0.0 else None
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        for start, stop in blocks:
            rows = torch.arange(start, stop, device=q.device)
            out[:, :, start:stop] = _block_output(causal_prefix(problem, stop - 1), rows, dropout_p)
        ctx.save_for_backward(q, k, v)
        ctx.problem, ctx.blocks, ctx.dropout_p = problem.with_(q=q[..., :0], k=k[..., :0],
                                                               v=v[..., :0]), blocks, dropout_p
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        problem = ctx.problem.with_(q=q, k=k, v=v)
        grads = dq, dk, dv = tuple(q.new_zeros(t.shape) for t in (q, k, v))  # contiguous
        devices = [q.device] if q.device.type == "cuda" else []
        with torch.random.fork_rng(devices, enabled=ctx.rng_state is not None):
            if ctx.rng_state is not None:
                _restore_rng_state(ctx.rng_state, q.device)
            for start, stop in ctx.blocks:
                block = causal_prefix(problem, stop - 1)
                keys, rows = block.num_keys, torch.arange(start, stop, device=q.device)
                scores = scaled_scores(block, rows).requires_grad_()
                with torch.enable_grad():
                    weights = _block_weights(block, scores, rows, ctx.dropout_p)
                grad_rows = grad_out[:, :, start:stop]
                (grad_scores,) = torch.autograd.grad(weights, scores, grad_rows @ block.v.mT)
                _add_product(dv, keys, weights.detach().mT, grad_rows)
                _add_product(dk, keys, grad_scores.mT, q[:, :, start:stop] * problem.scale)
                dq[:, :, start:stop] = (grad_scores @ block.k) * problem.scale
        return *grads, None, None, None


def needs_autograd(problem: AttentionProblem) -> bool:
    """Whether something besides q, k and v needs gradients: a float mask, or a tensor that a
    score modifier or the normalizer captures (probed on one constant score)."""
    if problem.attn_mask is not None and problem.attn_mask.requires_grad:
        return True
    score = problem.q.new_zeros(1, 1, 1, 1)
    index = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=score.device)
    score_mod = problem.score_mod()
    if score_mod is not None:
        score = score_mod(score, index, index, index, index)
    return problem.normalizer(score).requires_grad


def chunked_attention(problem: AttentionProblem, dropout_p: float = 0.0, *,
                      block_rows: int | None = None, recompute: bool | None = None) -> Tensor:
    """The eager kernel's output, computed ``block_rows`` query rows at a time.

    block_rows: rows per block (default :func:`rows_per_block`). recompute: recompute the blocks
    in the backward pass instead of keeping them (default: when gradients are enabled and there
    is more than one block).
    """
    if block_rows is not None and (isinstance(block_rows, bool) or not isinstance(block_rows, int)
                                   or block_rows < 1):
        raise ValueError(f"block_rows={block_rows!r}: expected a positive number of query rows")
    if torch.compiler.is_compiling():
        # One block: dynamo would unroll every block (and cannot trace the recomputing backward's
        # RNG fork), so a compiled graph materialises the score matrix; inductor fuses its passes.
        return eager_attention(problem, dropout_p)
    problem = with_contiguous_heads(problem)  # each block's products would copy k and v otherwise
    num_queries = problem.num_queries
    starts = range(0, num_queries, block_rows or rows_per_block(problem))
    if recompute is None:
        recompute = torch.is_grad_enabled() and len(starts) > 1
    if len(starts) <= 1 and not recompute:
        return eager_attention(problem, dropout_p)
    # Last rows first: under causal attention those see the most keys, so the blocks' buffers
    # shrink and reuse freed memory instead of growing the allocator's heap.
    blocks = [(start, min(start + starts.step, num_queries)) for start in reversed(starts)]
    if recompute and torch.is_grad_enabled() and not needs_autograd(problem):
        return _RecomputedBlocks.apply(problem.q, problem.k, problem.v, problem, blocks, dropout_p)
    outputs = []
    for start, stop in blocks:
        block = (causal_prefix(problem, stop - 1),
                 torch.arange(start, stop, device=problem.q.device), dropout_p)
        outputs.append(checkpoint(_block_output, *block, use_reentrant=False) if recompute
                       else _block_output(*block))
    return torch.cat(outputs[::-1], dim=-2)


@torch.no_grad()
def chunked_logsumexp(problem: AttentionProblem) -> Tensor:
    """Each row's log-sum-exp (B, H, Nq) in float32, block of rows by block (one more pass over
    the scores, without gradients: the contract's lse is a constant for autograd)."""
    step = rows_per_block(problem)
    return torch.cat([row_logsumexp(attention_logits(
        problem, torch.arange(start, min(start + step, problem.num_queries),
                              device=problem.q.device)))
        for start in range(0, problem.num_queries, step)], dim=-1)


def chunked_attention_with_lse(problem: AttentionProblem,
                               dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    return chunked_attention(problem, dropout_p), chunked_logsumexp(problem)


CHUNKED = Kernel("chunked", chunked_attention, lambda problem, dropout_p: None,
                 run_with_lse=chunked_attention_with_lse)

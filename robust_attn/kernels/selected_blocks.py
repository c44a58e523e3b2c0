"""Block-sparse attention on a per-call layout: each query block attends the key blocks chosen for
it in this call (block top-k selection: MoBA, NSA), and every key blocked elsewhere is skipped.

The layout is data, not a pattern: ``blocks`` (B, H, query blocks, S) int64 names, for each batch
item, head and query block, S key blocks of ``block`` token positions (distinct within a row).
Positions are aligned lower-right as in :mod:`robust_attn.problem`: the problem's keys are
``prepended_keys`` P keys (sinks: visible to every query) followed by T token keys, and query i
sits at position p_i = i + T - Nq, in query block floor(p_i / block). Query i attends

    the P prepended keys,  and token key t  when  floor(t / block) in blocks[b, h, floor(p_i / block)]
                                               (and t <= p_i when causal)

Each query block gathers its S key blocks (``torch.gather`` over the padded token keys viewed as
blocks; its backward is a scatter-add into them) and the prepended keys, and all blocks run in one
batched SDPA call: B H (T / block) block (P + S block) scores instead of B H Nq (P + T), with no
mask at all when nothing is blocked inside the gathered keys (not causal, T a multiple of block).
Unlike :mod:`robust_attn.kernels.block_sparse`, nothing is planned or cached: the layout changes
with every call, and is built from tensors without leaving them (no Python ints, no sync).

A query whose gathered keys are all blocked (causal attention where a selected block lies wholly
in the future, and no own block: only possible for a caller's layout without the own block)
attends a placeholder key and gets zeros, never nan.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..problem import AttentionProblem
from .base import Kernel


def selected_blocks_unsupported(problem: AttentionProblem, blocks: Tensor, block: int) -> str | None:
    """Why :func:`selected_blocks_attention` cannot run the problem with this layout, or None."""
    if problem.pattern is not None or problem.attn_mask is not None:
        return "the selected-blocks kernel takes no sparsity pattern or attn_mask besides its layout"
    if problem.score_mods or not problem.is_softmax:
        return "the selected-blocks kernel is SDPA on gathered keys: softmax, no score modifiers"
    tokens = problem.num_keys - problem.prepended_keys
    if problem.num_queries > tokens:
        return "the selected-blocks kernel needs every query among the token keys (Nq <= Nk - P)"
    query_blocks = -(-tokens // block)
    if blocks.dim() != 4 or blocks.shape[2] > query_blocks or blocks.dtype != torch.int64:
        return (f"blocks must be int64 (B, H, query blocks, S) with at most {query_blocks} "
                f"query blocks of {block} tokens, got {tuple(blocks.shape)} {blocks.dtype}")
    return None


def _positions(blocks: Tensor, block: int) -> Tensor:
    """(..., S * block): the token positions of the key blocks ``blocks`` (..., S)."""
    return (blocks[..., None] * block + torch.arange(block, device=blocks.device)).flatten(-2)


def selected_blocks_attention(problem: AttentionProblem, blocks: Tensor, block: int,
                              dropout_p: float = 0.0) -> Tensor:
    """(B, H, Nq, Dv): the problem's softmax attention restricted to the layout (module
    docstring). ``blocks`` (B, H, query blocks, S) int64 covers the query blocks from the one
    holding the first query's position on; check it with :func:`selected_blocks_unsupported`."""
    reason = selected_blocks_unsupported(problem, blocks, block)
    if reason is not None:
        raise ValueError(f"selected_blocks_attention: {reason}")
    q, k, v = problem.q, problem.k, problem.v
    batch, heads, num_queries = q.shape[:3]
    prepended, tokens = problem.prepended_keys, problem.num_keys - problem.prepended_keys
    first_position = tokens - num_queries
    lead = first_position % block  # query rows before the first query in its block
    first_block = first_position // block
    query_blocks = -(-(lead + num_queries) // block)
    blocks = blocks[:, :, first_block:first_block + query_blocks].expand(batch, heads, -1, -1)
    selected = blocks.shape[-1]

    def token_blocks(t: Tensor) -> Tensor:
        """(B, H, query blocks, S * block, D): the selected key blocks of t's token keys."""
        padded = F.pad(t[:, :, prepended:], (0, 0, 0, -tokens % block))
        as_blocks = padded.unflatten(2, (-1, block)).flatten(3)  # (B, H, key blocks, block * D)
        index = blocks.flatten(2)[..., None].expand(-1, -1, -1, as_blocks.shape[-1])
        gathered = torch.gather(as_blocks, 2, index)  # (B, H, query blocks * S, block * D)
        return gathered.view(batch, heads, query_blocks, selected * block, t.shape[-1])

    def keys(t: Tensor) -> Tensor:
        """(B * H, query blocks, P + S * block, D): the prepended keys and the selected blocks."""
        gathered = token_blocks(t)
        if prepended:
            shared = t[:, :, None, :prepended].expand(-1, -1, query_blocks, -1, -1)
            gathered = torch.cat([shared, gathered], dim=3)
        return gathered.flatten(0, 1)

    rows = F.pad(q, (0, 0, lead, query_blocks * block - lead - num_queries))
    rows = rows.flatten(0, 1).unflatten(1, (query_blocks, block))
    mask = None
    key_position = _positions(blocks, block)  # (B, H, query blocks, S * block)
    if problem.causal or tokens % block:
        query_position = (first_block * block + torch.arange(query_blocks * block, device=q.device)
                          ).view(query_blocks, block, 1)
        allowed = key_position[:, :, :, None, :] < tokens
        if problem.causal:
            allowed = allowed & (key_position[:, :, :, None, :] <= query_position)
        allowed = F.pad(allowed, (prepended, 0), value=True)
        has_key = allowed.any(dim=-1, keepdim=True)  # rows with none attend the first key
        allowed[..., :1] |= ~has_key
        mask = allowed.flatten(0, 1)
    out = F.scaled_dot_product_attention(rows, keys(k), keys(v), attn_mask=mask,
                                         dropout_p=dropout_p, scale=problem.scale)
    if mask is not None:
        out = out * has_key.flatten(0, 1).to(out.dtype)
    return out.flatten(1, 2)[:, lead:lead + num_queries].unflatten(0, (batch, heads))


def _unsupported(problem: AttentionProblem, dropout_p: float) -> str | None:
    if problem.selection is None:
        return "no per-call block selection (block_topk) to run"
    return selected_blocks_unsupported(problem, problem.selection.blocks, problem.selection.block)


SELECTED_BLOCKS = Kernel(
    "selected_blocks",
    lambda problem, dropout_p: selected_blocks_attention(
        problem, problem.selection.blocks, problem.selection.block, dropout_p),
    _unsupported, runs_selection=True,
    no_lse="the selected-blocks kernel runs SDPA, whose public function returns no log-sum-exp")
"""A problem's block selection (``problem.selection``), skipping the unselected blocks."""


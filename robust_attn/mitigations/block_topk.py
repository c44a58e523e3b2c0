"""Block top-k attention: each query block attends its own block plus the k key blocks it scores
highest, a content-adaptive sparsity (MoBA; NSA's selection branch).

The tokens' keys are cut into blocks of ``block_size`` positions (the last may be shorter), and
so are the queries, by their token position (queries aligned lower-right, as causality is). For
query block a and key block b, with mean(.) over the block's tokens::

    g_ab = mean(Q_a) . mean(K_b)                       (the gate, no gradient)
    S_a  = {a} | top_k { b != a : b <= a if causal }   (ties: torch.topk's choice)
    s_ij = -inf  unless block(j) in S_block(i)         (then as without the option)

so every query of a block sees the same blocks: a block-sparse layout, differentiable through
the attention on the selected blocks; the selection itself is a discrete choice with no
gradient, as in MoBA. Keys prepended by other mitigations (sinks: ``prepended_keys``) are not
blocks and stay visible to every query; the user's mask and causality still apply inside the
selected blocks (a bool mask is ANDed, a float mask gets -inf outside them).

Sources, and where this deviates:

- MoBA (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs",
  arXiv:2502.13189; MoonshotAI/MoBA ``moba_naive.py``): the gate q_i . mean(K_b), future blocks
  excluded and the query's own block always selected. MoBA gates each query on its own and its
  top-k counts the own block; here the gate uses the block's mean query (one selection per
  query block, the layout a block-sparse kernel runs) and k counts the blocks beyond the own
  one (the issue's wording: "its own block plus the k key blocks").
- NSA (Yuan et al. 2025, "Native Sparse Attention", arXiv:2502.11089): selects top-n blocks
  from its compressed-attention scores, shared within a GQA group, beside a compression and a
  sliding-window branch. Only the selection idea is taken: no compression branch, no gated
  mixture, and the score is MoBA's mean-key gate; RobustAttention has one key head per query
  head, so there is no group to share over.

Cost: the selection is B H (N / block_size)^2 dot products. It joins the problem as a per-call
block selection (:class:`robust_attn.sparse.selection.BlockSelection`), which the selected-blocks
kernel (:mod:`robust_attn.kernels.selected_blocks`) runs on the selected blocks only: B H N
(k + 1) block_size scores instead of B H N^2. Where that kernel cannot run (a user's mask, a
sparsity pattern, score modifiers, sigmoid, a log-sum-exp asked for), the selection becomes a
dense bool mask and the usual kernels compute every score: correct, not faster
(benchmarks/block_topk.py measures both).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..claim import ENTROPY, RANK, Claim, witnesses_at
from ..config import AttentionConfig
from ..problem import AttentionProblem
from ..sparse.selection import BlockSelection
from .base import Mitigation

if TYPE_CHECKING:
    from ..call import AttentionCall


def _block_means(x: Tensor, blocks: Tensor, num_blocks: int) -> Tensor:
    """The mean of x (B, H, N, D) over the rows of each block (``blocks``: N block indices),
    (B, H, num_blocks, D); a block with no row gets zeros."""
    sums = x.new_zeros(*x.shape[:2], num_blocks, x.shape[-1]).index_add_(2, blocks, x)
    counts = x.new_zeros(num_blocks).index_add_(0, blocks, x.new_ones(blocks.shape)).clamp_min(1)
    return sums / counts[:, None]


@torch.no_grad()
def selected_key_blocks(q: Tensor, keys: Tensor, block_size: int, k: int, causal: bool) -> Tensor:
    """Int64 (B, H, key blocks, min(k, key blocks - 1) + 1): for each block of positions, the own
    block first, then the k others its mean query scores highest against their mean key (module
    docstring), over the tokens' keys ``keys`` (B, H, Nk, D) and the queries ``q`` aligned to the
    last Nq of the Nk positions: the per-call layout of
    :func:`robust_attn.kernels.selected_blocks.selected_blocks_attention`. Distinct in each row."""
    num_queries, num_keys = q.shape[-2], keys.shape[-2]
    num_blocks = math.ceil(num_keys / block_size)
    key_blocks = torch.arange(num_keys, device=q.device) // block_size
    query_blocks = (torch.arange(num_queries, device=q.device) + num_keys - num_queries) // block_size
    dtype = torch.promote_types(q.dtype, torch.float32)
    gate = (_block_means(q.to(dtype), query_blocks, num_blocks)
            @ _block_means(keys.to(dtype), key_blocks, num_blocks).mT)
    rows = torch.arange(num_blocks, device=q.device)
    candidate = rows[None, :] != rows[:, None]
    if causal:
        candidate &= rows[None, :] < rows[:, None]
    gate = gate.masked_fill(~candidate, -math.inf)
    # Where fewer than k blocks are candidates (early blocks under causality) topk also returns
    # future ones, -inf: harmless, since causality blocks every key of a future block.
    top = gate.topk(min(k, num_blocks - 1), dim=-1).indices
    return torch.cat([rows[:, None].expand(*top.shape[:-1], 1), top], dim=-1)


@torch.no_grad()
def selected_blocks(q: Tensor, keys: Tensor, block_size: int, k: int, causal: bool) -> Tensor:
    """Bool (B, H, Nq, Nk) over the tokens' keys ``keys`` (B, H, Nk, D): True where key j lies in
    a block selected for query i's block (:func:`selected_key_blocks`). Queries are aligned to the
    last Nq of the Nk positions."""
    num_queries, num_keys = q.shape[-2], keys.shape[-2]
    if num_queries == 0 or num_keys == 0:  # nothing to select
        return torch.zeros(*q.shape[:2], num_queries, num_keys, dtype=torch.bool, device=q.device)
    selection = BlockSelection(selected_key_blocks(q, keys, block_size, k, causal), block_size)
    return selection.allowed(num_queries, num_keys, 0)


class BlockTopK(Mitigation):
    """``block_topk=(block_size, k)``: each query block attends its own block plus the k key
    blocks of ``block_size`` tokens whose mean key its mean query scores highest (module
    docstring). No parameters; the selection adds no health quantity (the probe's sparsity and
    entropy are over the allowed keys)."""

    option = "block_topk"
    claims = (
        Claim(
            "block_topk", "Lu et al. 2025 (MoBA); Yuan et al. 2025 (NSA)",
            "attending the top-k key blocks chosen by content keeps full attention's quality at "
            "a fraction of its cost; no claim about collapse at initialisation",
            note="Measured: neither. The blocks each query block selects overlap with other "
                 "blocks' selections, so tokens still mix across the sequence and collapse with "
                 "the baseline: at the witnesses (32 tokens, 4 blocks of 8, 3 attended) res(X) "
                 "1.5e-07 (baseline 1.3e-07) attention only at sqk 1, worst-layer H 0.0034 "
                 "(baseline 0.0062) with residual at sqk 16.",
            witnesses=witnesses_at("block_topk", RANK, ENTROPY),
        ),
    )
    # MoBA's typical setting, 3 of 16 blocks attended (block 512, top-k 3 with the own block, at
    # 8k tokens), scaled to the claims' 32-64 tokens: blocks of 8 tokens, own + 2 (3 of 8 at 64).
    presets = {"block_topk": {"block_topk": (8, 2)}}

    def __init__(self, block_size: int, k: int):
        super().__init__()
        self.block_size = block_size
        self.k = k

    @classmethod
    def from_option(cls, value: Any, config: AttentionConfig) -> BlockTopK | None:
        if value is None or value is False:
            return None
        if (not isinstance(value, (tuple, list)) or len(value) != 2
                or any(isinstance(n, bool) or not isinstance(n, int) for n in value)
                or value[0] < 1 or value[1] < 0):
            raise ValueError(f"block_topk={value!r}: expected (block_size, k), a positive block "
                             "size in tokens and k >= 0 key blocks beyond each query's own, "
                             "e.g. (64, 2); or None")
        return cls(*value)

    def saved_value(self) -> tuple[int, int]:
        return (self.block_size, self.k)

    def extend_keys(self, problem: AttentionProblem, call: AttentionCall) -> AttentionProblem:
        """The problem with its block selection (robust_attn.sparse.selection): the
        selected-blocks kernel skips the other blocks; any other kernel gets the selection as a
        mask, prepended keys allowed."""
        tokens = problem.k[..., problem.prepended_keys:, :]
        if problem.num_queries == 0 or tokens.shape[-2] == 0:  # nothing to select
            return problem
        blocks = selected_key_blocks(problem.q, tokens, self.block_size, self.k, problem.causal)
        return problem.with_(selection=BlockSelection(blocks, self.block_size))

    def extra_repr(self) -> str:
        return f"block_size={self.block_size}, k={self.k}"

"""A per-call block selection: which key blocks each query block attends in this call (block top-k,
MoBA / NSA's selection), as part of the attention problem.

Unlike a :class:`~robust_attn.sparse.Pattern` (a value, the same for every batch item, head and
call, which kernels plan and cache), a selection is data: ``blocks`` (B|1, H|1, position blocks,
S) int64 names, per batch item, head and block of ``block`` token positions, the S key blocks
that the queries of that block attend. Positions are aligned lower-right as everywhere in
:mod:`robust_attn.problem`: of the Nk keys, the first P = ``prepended_keys`` are prepended
(sinks, visible to every query) and the other T are tokens; query i sits at position
p_i = i + T - Nq. Query i may attend

    every prepended key,   and token key t  when  floor(t / block) in blocks[b, h, floor(p_i / block)]

on top of what the problem's mask, causality and pattern allow. The selected-blocks kernel
(:mod:`robust_attn.kernels.selected_blocks`) runs it without computing the other blocks; every
other kernel gets it as a dense bool mask (:meth:`BlockSelection.allowed`), built when that
kernel is the one that runs (:meth:`robust_attn.problem.AttentionProblem.with_selection_as_mask`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True, eq=False)
class BlockSelection:
    """``blocks`` (B|1, H|1, position blocks, S) int64, distinct in each row; ``block`` tokens per
    block (module docstring)."""

    blocks: Tensor
    block: int

    def allowed(self, num_queries: int, num_keys: int, prepended_keys: int,
                query_index: Tensor | None = None) -> Tensor:
        """Bool (B|1, H|1, Nq', Nk): True where the selection lets query row i (``query_index``,
        all Nq rows when None) attend key j; prepended keys always True."""
        device = self.blocks.device
        tokens = num_keys - prepended_keys
        rows = torch.arange(num_queries, device=device) if query_index is None else query_index
        position_blocks = self.blocks.shape[-2]
        chosen = torch.zeros(*self.blocks.shape[:-1], position_blocks, dtype=torch.bool,
                             device=device).scatter_(-1, self.blocks, True)
        key_blocks = torch.arange(tokens, device=device) // self.block
        query_blocks = (rows + tokens - num_queries) // self.block
        token_keys = chosen[..., query_blocks, :][..., key_blocks]
        return torch.nn.functional.pad(token_keys, (prepended_keys, 0), value=True)

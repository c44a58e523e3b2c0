"""Block-diagonal attention by reshaping blocks into the batch.

For ``BlockLocal(block)`` (optionally causal: problem.causal or ``& Causal()``)
the N tokens are N // block whole blocks, viewed as (B, H, N // block, block, D)
without a copy, and a shorter last block when block does not divide N; each is
one SDPA call with no mask. Work: N * block scores instead of N^2.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..problem import AttentionProblem
from ..sparse import BlockLocal, split_causal
from .base import Kernel
from .structured import attend_within_groups, structured_unsupported


def _split(block: int):
    def split(x: Tensor) -> list[Tensor]:
        whole = x.shape[2] // block * block
        return [x[:, :, :whole].unflatten(2, (-1, block)), x[:, :, whole:].unsqueeze(2)]

    return split


def _merge(outs: list[Tensor]) -> Tensor:
    return torch.cat([out.flatten(2, 3) for out in outs], dim=2)


def block_diagonal_attention(problem: AttentionProblem, dropout_p: float = 0.0) -> Tensor:
    block_local, causal = split_causal(problem.pattern)
    return attend_within_groups(problem, dropout_p, causal or problem.causal,
                                _split(block_local.block), _merge)


def _unsupported(problem: AttentionProblem, dropout_p: float) -> str | None:
    reason = structured_unsupported(problem)
    if reason is not None:
        return reason
    if not isinstance(split_causal(problem.pattern)[0], BlockLocal):
        return "the block_diagonal kernel runs BlockLocal patterns (optionally causal) only"
    if problem.num_keys != problem.num_queries:
        return "the block_diagonal kernel needs Nk == Nq (no prepended keys)"
    return None


BLOCK_DIAGONAL = Kernel("block_diagonal", block_diagonal_attention, _unsupported)

"""Child et al.'s "fixed" pattern: the query's own block plus summary columns of every block.

    allowed(i, j) = floor(i / block) == floor(j / block)  or  j mod block >= block - summary

The last ``summary`` positions of each block summarise it for all other
queries (combine with :class:`~robust_attn.sparse.Causal` for the
autoregressive version of the paper).

Source: Child et al. 2019, "Generating Long Sequences with Sparse
Transformers", fixed pattern: A(1) = {j : floor(j / l) = floor(i / l)},
A(2) = {j : j mod l in {t, ..., l}} with t = l - c.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .pattern import KeyRanges, MaskMod, Pattern, check_positive, check_tokens, key_range


@dataclass(frozen=True)
class Fixed(Pattern):
    """Own block of ``block`` tokens, plus the last ``summary`` tokens of every block."""

    block: int
    summary: int
    source: ClassVar[str] = "Child et al. 2019, Sparse Transformers (fixed)"

    def __post_init__(self):
        check_positive("block", self.block)
        check_positive("summary", self.summary)
        if self.summary > self.block:
            raise ValueError(f"summary={self.summary} does not fit in block={self.block}: "
                             "the summary columns are the last positions of each block")

    def mask_mod(self, num_tokens: int) -> MaskMod:
        check_tokens(num_tokens)
        block, first_summary = self.block, self.block - self.summary

        def fixed(b, h, q_idx, kv_idx):
            return (q_idx // block == kv_idx // block) | (kv_idx % block >= first_summary)

        return fixed

    def key_ranges(self, num_tokens: int, rows: Tensor) -> KeyRanges:
        # The own block; the summary columns are global keys.
        start = rows // self.block * self.block
        return key_range(start, start + self.block)

    def global_keys(self, num_tokens: int) -> frozenset[int]:
        return frozenset(j for j in range(num_tokens)
                         if j % self.block >= self.block - self.summary)

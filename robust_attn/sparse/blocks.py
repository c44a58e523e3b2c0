"""Block-local (block-diagonal) attention: queries attend the keys of their own block.

    allowed(i, j) = floor(i / block) == floor(j / block)

The last block is shorter when ``block`` does not divide N.

Sources: Parmar et al. 2018, "Image Transformer" (local 1D attention blocks);
Qiu et al. 2020, "Blockwise Self-Attention for Long Document Understanding";
the first half of Child et al. 2019's "fixed" pattern.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .pattern import KeyRanges, MaskMod, Pattern, check_positive, check_tokens, key_range


@dataclass(frozen=True)
class BlockLocal(Pattern):
    """Keys in the query's own block of ``block`` consecutive tokens: i // block == j // block."""

    block: int
    source: ClassVar[str] = ("Parmar et al. 2018, Image Transformer; Qiu et al. 2020, "
                             "Blockwise Self-Attention")

    def __post_init__(self):
        check_positive("block", self.block)

    def mask_mod(self, num_tokens: int) -> MaskMod:
        check_tokens(num_tokens)
        block = self.block

        def block_local(b, h, q_idx, kv_idx):
            return q_idx // block == kv_idx // block

        return block_local

    def key_ranges(self, num_tokens: int, rows: Tensor) -> KeyRanges:
        start = rows // self.block * self.block
        return key_range(start, start + self.block)

"""Strided attention: queries attend the keys a multiple of ``stride`` away.

    allowed(i, j) = (i - j) mod stride == 0

so the tokens split into ``stride`` residue classes that attend only within
themselves. Child et al. pair it with a local window of the same length in
other heads or layers, so that two steps connect every pair of tokens.

Source: Child et al. 2019, "Generating Long Sequences with Sparse
Transformers", the strided pattern A(2) = {j : (i - j) mod l = 0}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .pattern import MaskMod, Pattern, check_positive, check_tokens


@dataclass(frozen=True)
class Strided(Pattern):
    """Keys a multiple of ``stride`` positions away: (i - j) mod stride == 0."""

    stride: int
    source: ClassVar[str] = "Child et al. 2019, Sparse Transformers (strided, A(2))"

    def __post_init__(self):
        check_positive("stride", self.stride)

    def mask_mod(self, num_tokens: int) -> MaskMod:
        check_tokens(num_tokens)
        stride = self.stride

        def strided(b, h, q_idx, kv_idx):
            return (q_idx - kv_idx) % stride == 0

        return strided

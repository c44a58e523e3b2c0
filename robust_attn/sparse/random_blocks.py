"""BigBird-style random blocks: each query block attends ``count`` key blocks drawn with a seed.

    allowed(i, j) = floor(j / block) in { r(floor(i / block), t) : t < count }
    r(p, t)       = hash(seed, p, t) mod ceil(N / block)

Draws are with replacement (a query block may get fewer than ``count``
distinct blocks). ``hash`` is an integer mixing function, so the same seed
gives the same blocks on every device, in the eager reference, the
structured kernels and FlexAttention; a new sequence length draws anew.

Source: Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences"
(random attention, r random key blocks per query block). BigBird is
``SlidingWindow(...) | GlobalTokens(...) | RandomBlocks(...)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
from torch import Tensor

from .pattern import KeyRanges, MaskMod, Pattern, check_positive, check_tokens

_Int = TypeVar("_Int", int, Tensor)
_MASK32 = 0xFFFFFFFF


def _mix(x: _Int) -> _Int:
    """A 32-bit integer hash (the "hash32" mixer, two rounds of xorshift-multiply).
    Values stay below 2**59, so int64 tensors never overflow."""
    for _ in range(2):
        x = (((x >> 16) ^ x) * 0x45D9F3B) & _MASK32
    return ((x >> 16) ^ x) & _MASK32


def _drawn(q_idx: Tensor, block: int, count: int, seed: int, num_blocks: int) -> list[Tensor]:
    """r(floor(i / block), t) for t < count: the key blocks drawn for each query (q_idx's shape);
    ``seed`` is the pattern's seed mixed once."""
    # int64: the mixer's products overflow int32 (FlexAttention's index dtype).
    first = _mix((q_idx.to(torch.int64) // block) * count ^ seed)
    return [_mix(first + t) % num_blocks for t in range(count)]


@dataclass(frozen=True)
class RandomBlocks(Pattern):
    """``count`` key blocks of ``block`` tokens for each query block, drawn from ``seed``."""

    block: int
    count: int
    seed: int = 0
    source: ClassVar[str] = "Zaheer et al. 2020, Big Bird (random attention)"

    def __post_init__(self):
        check_positive("block", self.block)
        check_positive("count", self.count)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed={self.seed!r}: expected an integer >= 0")

    def mask_mod(self, num_tokens: int) -> MaskMod:
        num_blocks = -(-check_tokens(num_tokens) // self.block)
        block, count, seed = self.block, self.count, _mix(self.seed & _MASK32)

        def random_blocks(b, h, q_idx, kv_idx):
            key_block = kv_idx // block
            blocks = _drawn(q_idx, block, count, seed, num_blocks)
            allowed = key_block == blocks[0]
            for other in blocks[1:]:
                allowed = allowed | (key_block == other)
            return allowed

        return random_blocks

    def key_ranges(self, num_tokens: int, rows: Tensor) -> KeyRanges:
        drawn = _drawn(rows, self.block, self.count, _mix(self.seed & _MASK32),
                       -(-num_tokens // self.block))
        starts = torch.stack(drawn, dim=1) * self.block
        return torch.stack([starts, starts + self.block], dim=-1)

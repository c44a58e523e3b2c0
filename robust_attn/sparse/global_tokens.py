"""Global tokens: the first ``count`` tokens attend every key and every query attends them.

    allowed(i, j) = i < count  or  j < count

Combine with a local pattern (``SlidingWindow(w) | GlobalTokens(g)``) so that
information crosses the whole sequence in two steps.

Sources: Beltagy et al. 2020, "Longformer" (global attention on chosen
tokens); Zaheer et al. 2020, "Big Bird: Transformers for Longer Sequences"
(global tokens, ITC).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .pattern import KeyRanges, MaskMod, Pattern, check_positive, check_tokens, key_range


@dataclass(frozen=True)
class GlobalTokens(Pattern):
    """The first ``count`` tokens see and are seen by all: i < count or j < count."""

    count: int
    source: ClassVar[str] = "Beltagy et al. 2020, Longformer; Zaheer et al. 2020, Big Bird"

    def __post_init__(self):
        check_positive("count", self.count)

    def mask_mod(self, num_tokens: int) -> MaskMod:
        check_tokens(num_tokens)
        count = self.count

        def global_tokens(b, h, q_idx, kv_idx):
            return (q_idx < count) | (kv_idx < count)

        return global_tokens

    def global_keys(self, num_tokens: int) -> frozenset[int]:
        return frozenset(range(min(self.count, num_tokens)))

    def key_ranges(self, num_tokens: int, rows: Tensor) -> KeyRanges:
        # Global queries attend every key; the others only the global keys.
        return key_range(torch.zeros_like(rows), torch.where(rows < self.count, num_tokens, 0))

"""Local (sliding window) attention: each query attends the keys within ``window`` positions.

    symmetric:  |i - j| < window          (2 * window - 1 keys away from the ends)
    causal:     0 <= i - j < window        (the query and the window - 1 keys before it)

Sources: Child et al. 2019, "Generating Long Sequences with Sparse Transformers"
(the local half of the strided pattern); Beltagy et al. 2020, "Longformer: The
Long-Document Transformer" (symmetric sliding window); Jiang et al. 2023,
"Mistral 7B" (causal sliding window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .pattern import MaskMod, Pattern, check_positive, check_tokens


@dataclass(frozen=True)
class SlidingWindow(Pattern):
    """Keys within ``window`` positions of the query: |i - j| < window, or 0 <= i - j < window
    when ``causal``."""

    window: int
    causal: bool = False
    source: ClassVar[str] = ("Child et al. 2019 (local); Beltagy et al. 2020, Longformer; "
                             "Jiang et al. 2023, Mistral 7B (causal)")

    def __post_init__(self):
        check_positive("window", self.window)

    def mask_mod(self, num_tokens: int) -> MaskMod:
        check_tokens(num_tokens)
        window, causal = self.window, self.causal

        def sliding_window(b, h, q_idx, kv_idx):
            distance = q_idx - kv_idx
            if causal:
                return (distance >= 0) & (distance < window)
            return distance.abs() < window

        return sliding_window

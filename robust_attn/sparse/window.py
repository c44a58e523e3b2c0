"""Local (sliding window) attention: each query attends the keys within ``window`` positions.

    symmetric:  |i - j| < window          (2 * window - 1 keys: window - 1 on each side
                                           and the query's own, fewer near the ends)
    causal:     0 <= i - j < window        (window keys: the query's own and the window - 1
                                           before it)

Other conventions, in our terms. Longformer's "window size w" is w / 2 keys on each
side plus the query's own, w + 1 keys: ``SlidingWindow(w // 2 + 1)``. Child et
al.'s local pattern A_i = {max(0, i - l), ..., i} is the query and the l keys
before it, l + 1 keys: ``SlidingWindow(l + 1, causal=True)``. :meth:`SlidingWindow.longformer`
and :meth:`SlidingWindow.child_local` build them from the papers' numbers.

Sources: Child et al. 2019, "Generating Long Sequences with Sparse Transformers"
(the local half of the strided pattern); Beltagy et al. 2020, "Longformer: The
Long-Document Transformer" (symmetric sliding window); Jiang et al. 2023,
"Mistral 7B" (causal sliding window).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from .pattern import KeyRanges, MaskMod, Pattern, check_positive, check_tokens, key_range


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

    @classmethod
    def longformer(cls, window_size: int) -> SlidingWindow:
        """Longformer's window of size w (even): w / 2 keys on each side and the query's own."""
        if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 2 \
                or window_size % 2:
            raise ValueError(f"window_size={window_size!r}: expected an even integer >= 2 "
                             f"(Longformer's w: w / 2 keys on each side)")
        return cls(window_size // 2 + 1)

    @classmethod
    def child_local(cls, lookback: int) -> SlidingWindow:
        """Child et al.'s causal local pattern: the query and the ``lookback`` (l) keys before it."""
        if isinstance(lookback, bool) or not isinstance(lookback, int) or lookback < 0:
            raise ValueError(f"lookback={lookback!r}: expected an integer >= 0 (Child et al.'s l)")
        return cls(lookback + 1, causal=True)

    def mask_mod(self, num_tokens: int) -> MaskMod:
        check_tokens(num_tokens)
        window, causal = self.window, self.causal

        def sliding_window(b, h, q_idx, kv_idx):
            distance = q_idx - kv_idx
            if causal:
                return (distance >= 0) & (distance < window)
            return distance.abs() < window

        return sliding_window

    def key_ranges(self, num_tokens: int, rows: Tensor) -> KeyRanges:
        return key_range(rows - self.window + 1, rows + (1 if self.causal else self.window))

"""Sparse attention patterns as composable FlexAttention-style mask functions.

    from . import SlidingWindow, GlobalTokens, RandomBlocks
    pattern = SlidingWindow(128) | GlobalTokens(2) | RandomBlocks(64, count=2, seed=0)
    RobustAttention(dim, num_heads, sparsity=pattern)

Each pattern gives ``mask_mod(num_tokens)``, FlexAttention's
``(b, h, q_idx, kv_idx) -> bool`` for that length; ``&`` and ``|`` combine
patterns. Which kernel runs a pattern: see :mod:`robust_attn.kernels`.
Pictures: :func:`robust_attn.sparse.plot.save_pattern_png` (needs the ``plot`` extra).
"""

from .blocks import BlockLocal
from .fixed import Fixed
from .global_tokens import GlobalTokens
from .grid import AxialColumns, AxialRows, GridWindow
from .pattern import AllOf, AnyOf, Causal, MaskMod, Pattern, split_causal
from .random_blocks import RandomBlocks
from .strided import Strided
from .window import SlidingWindow

__all__ = [
    "AllOf",
    "AnyOf",
    "AxialColumns",
    "AxialRows",
    "BlockLocal",
    "Causal",
    "Fixed",
    "GlobalTokens",
    "GridWindow",
    "MaskMod",
    "Pattern",
    "RandomBlocks",
    "SlidingWindow",
    "Strided",
    "split_causal",
]

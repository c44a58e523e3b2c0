"""2D patterns for image tokens: local windows on the patch grid and axial rows / columns.

Tokens are ``prefix`` tokens (class token, registers) followed by a
``height x width`` patch grid in row-major order, as in timm's ViTs: token t
>= prefix sits at row y = (t - prefix) // width, column x = (t - prefix) % width.
Prefix tokens are global: they attend every key and every query attends them.

    GridWindow:   |y_i - y_j| < window and |x_i - x_j| < window   (a (2 window - 1)^2 square)
    AxialRows:    y_i == y_j
    AxialColumns: x_i == x_j

Sources: Ramachandran et al. 2019, "Stand-Alone Self-Attention in Vision
Models" and Hassani et al. 2023, "Neighborhood Attention Transformer" (local
2D windows); Ho et al. 2019, "Axial Attention in Multidimensional
Transformers" (rows and columns, used in alternating layers); Darcet et al.
2024, "Vision Transformers Need Registers" (prefix tokens).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from .pattern import KeyRanges, MaskMod, Pattern, check_positive, check_tokens, key_range


@dataclass(frozen=True)
class _GridPattern(Pattern):
    """A rule on patch coordinates, with global prefix tokens."""

    grid: tuple[int, int]
    prefix: int = field(default=0, kw_only=True)

    def __post_init__(self):
        if not (isinstance(self.grid, tuple) and len(self.grid) == 2):
            raise ValueError(f"grid={self.grid!r}: expected a (height, width) tuple")
        check_positive("grid height", self.grid[0])
        check_positive("grid width", self.grid[1])
        if isinstance(self.prefix, bool) or not isinstance(self.prefix, int) or self.prefix < 0:
            raise ValueError(f"prefix={self.prefix!r}: expected an integer >= 0")

    def rule(self, y_q: Tensor, x_q: Tensor, y_k: Tensor, x_k: Tensor) -> Tensor:
        raise NotImplementedError

    def grid_rows(self, y_q: Tensor) -> tuple[Tensor, Tensor] | None:
        """Grid rows [first, stop) holding every patch the rule allows for a query in row ``y_q``
        (None: no bound), for :meth:`key_ranges`."""
        return None

    def key_ranges(self, num_tokens: int, rows: Tensor) -> KeyRanges | None:
        # Prefix queries attend every key; patches the keys of their grid rows (prefix keys
        # are global).
        width = self.grid[1]
        bound = self.grid_rows((rows - self.prefix).clamp_min(0) // width)
        if bound is None:
            return None
        prefix_query = rows < self.prefix
        start = torch.where(prefix_query, 0, self.prefix + bound[0] * width)
        return key_range(start, torch.where(prefix_query, num_tokens, self.prefix + bound[1] * width))

    def mask_mod(self, num_tokens: int) -> MaskMod:
        height, width = self.grid
        prefix = self.prefix
        if check_tokens(num_tokens) != prefix + height * width:
            raise ValueError(f"grid={self.grid} with prefix={prefix} covers "
                             f"{prefix + height * width} tokens, but the sequence has {num_tokens}")
        rule = self.rule

        def grid_mask(b, h, q_idx, kv_idx):
            q, k = (q_idx - prefix).clamp_min(0), (kv_idx - prefix).clamp_min(0)
            on_grid = rule(q // width, q % width, k // width, k % width)
            return (q_idx < prefix) | (kv_idx < prefix) | on_grid

        return grid_mask

    def global_keys(self, num_tokens: int) -> frozenset[int]:
        return frozenset(range(min(self.prefix, num_tokens)))


@dataclass(frozen=True)
class GridWindow(_GridPattern):
    """Patches within ``window`` rows and columns of the query patch (a square neighbourhood)."""

    window: int
    source: ClassVar[str] = ("Ramachandran et al. 2019, Stand-Alone Self-Attention; "
                             "Hassani et al. 2023, Neighborhood Attention")

    def __post_init__(self):
        super().__post_init__()
        check_positive("window", self.window)

    def rule(self, y_q, x_q, y_k, x_k):
        return ((y_q - y_k).abs() < self.window) & ((x_q - x_k).abs() < self.window)

    def grid_rows(self, y_q):
        return y_q - self.window + 1, y_q + self.window


@dataclass(frozen=True)
class AxialRows(_GridPattern):
    """Patches in the query's grid row."""

    source: ClassVar[str] = "Ho et al. 2019, Axial Attention (rows)"

    def rule(self, y_q, x_q, y_k, x_k):
        return y_q == y_k

    def grid_rows(self, y_q):
        return y_q, y_q + 1


@dataclass(frozen=True)
class AxialColumns(_GridPattern):
    """Patches in the query's grid column."""

    source: ClassVar[str] = "Ho et al. 2019, Axial Attention (columns)"

    def rule(self, y_q, x_q, y_k, x_k):
        return x_q == x_k

"""Draw every sparsity pattern as a PNG (docs/patterns/<name>.png) with robust_attn.sparse.plot.

    .venv/bin/python benchmarks/sparse_pictures.py [--quick] [--out docs/patterns]

Small sizes (64 tokens; an 8 x 8 grid after one class token) so single cells are visible.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from robust_attn.sparse import (
    AxialColumns,
    AxialRows,
    BlockLocal,
    Causal,
    Fixed,
    GlobalTokens,
    GridWindow,
    RandomBlocks,
    SlidingWindow,
    Strided,
)
from robust_attn.sparse.plot import save_pattern_png

DOCS = Path(__file__).resolve().parent.parent / "docs" / "patterns"

TOKENS = 64
GRID, PREFIX = (8, 8), 1

PICTURES = {
    "sliding_window": (SlidingWindow(6), TOKENS),
    "sliding_window_causal": (SlidingWindow(12, causal=True), TOKENS),
    "strided": (Strided(8), TOKENS),
    "strided_causal": (Strided(8) & Causal(), TOKENS),
    "fixed_causal": (Fixed(16, summary=2) & Causal(), TOKENS),
    "block_local": (BlockLocal(16), TOKENS),
    "global_tokens_and_window": (SlidingWindow(4) | GlobalTokens(4), TOKENS),
    "random_blocks": (RandomBlocks(8, count=2, seed=0), TOKENS),
    "bigbird": (SlidingWindow(6) | GlobalTokens(4) | RandomBlocks(8, count=1, seed=0), TOKENS),
    "grid_window": (GridWindow(GRID, 2, prefix=PREFIX), PREFIX + GRID[0] * GRID[1]),
    "axial_rows": (AxialRows(GRID, prefix=PREFIX), PREFIX + GRID[0] * GRID[1]),
    "axial_columns": (AxialColumns(GRID, prefix=PREFIX), PREFIX + GRID[0] * GRID[1]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the first two patterns only")
    parser.add_argument("--out", type=Path, default=DOCS,
                        help="folder for the PNGs (default: the checkout's docs/patterns)")
    args = parser.parse_args()
    for name, (pattern, tokens) in list(PICTURES.items())[:2 if args.quick else None]:
        path = save_pattern_png(pattern, tokens, args.out / f"{name}.png", title=name)
        print(path)


if __name__ == "__main__":
    main()

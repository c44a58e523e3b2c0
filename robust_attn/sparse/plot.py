"""Pictures of sparsity patterns: the (query, key) grid, allowed pairs dark.

Needs matplotlib (``pip install 'robust-attn[plot]'``), imported only when a
picture is drawn. Uses matplotlib's object API (no pyplot), so it changes no
global backend or figure state.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .pattern import Pattern

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("drawing sparsity patterns needs matplotlib: "
                          "pip install 'robust-attn[plot]'") from error
    return Figure


def pattern_figure(pattern: Pattern, num_tokens: int, title: str | None = None) -> Figure:
    """A matplotlib Figure of ``pattern`` over ``num_tokens`` tokens (rows: queries, columns: keys),
    titled with ``title`` (default: the pattern) and its density."""
    allowed = pattern.dense(num_tokens)
    figure = _figure_class()(figsize=(4.2, 4.6), layout="constrained")
    axes = figure.add_subplot()
    axes.imshow(allowed.numpy(), cmap="Greys", vmin=0, vmax=1.25, interpolation="nearest")
    axes.set_xlabel("key j")
    axes.set_ylabel("query i")
    density = allowed.float().mean().item()
    axes.set_title(f"{title or pattern}\nN = {num_tokens}, density {density:.3f}", fontsize=9,
                   wrap=True)
    return figure


def save_pattern_png(pattern: Pattern, num_tokens: int, path: str | Path,
                     title: str | None = None) -> Path:
    """Write :func:`pattern_figure` to ``path`` as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pattern_figure(pattern, num_tokens, title).savefig(path, dpi=110)
    return path

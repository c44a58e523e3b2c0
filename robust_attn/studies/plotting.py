"""Pictures: stack health, attention maps, health curves over training, trainability diagrams.

matplotlib is imported only when a picture is asked for (the ``plot`` extra);
without it every function raises an ImportError that says how to install it.
Each function writes one PNG and returns its path. Sparsity patterns have
their own picture, :func:`robust_attn.sparse.plot.save_pattern_png`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

VERDICT_COLOURS = {"healthy": "#4daf4a", "rank collapse": "#377eb8",
                   "entropy collapse": "#e41a1c", "both": "#984ea3"}


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or an ImportError saying how to
    get it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("pictures need matplotlib: pip install 'robust-attn[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_stack_health(reports, path: Path) -> Path:
    """Two heatmaps, one row per variant and one column per (stack kind, sqk): the worst layer's
    entropy (left) and the output's res(X) on a log scale (right), each cell labelled with its
    value and each map with its colourbar. Collapse shows as the dark end of either map."""
    plt = pyplot()
    from matplotlib.colors import LogNorm

    variants = list(dict.fromkeys(r.setting.variant for r in reports))
    columns = sorted({(r.setting.residual, r.setting.qk_scale) for r in reports})
    by_cell = {(r.setting.variant, r.setting.residual, r.setting.qk_scale): r for r in reports}

    def grid(value):
        return [[value(by_cell[(variant, *column)]) if (variant, *column) in by_cell else math.nan
                 for column in columns] for variant in variants]

    entropy = grid(lambda report: report.worst_entropy)
    residual = grid(lambda report: max(report.final_residual, 1e-12))
    labels = [f"{'residual' if residual_stack else 'attn only'}\nsqk {scale:g}"
              for residual_stack, scale in columns]
    figure, axes = plt.subplots(1, 2, figsize=(4 + 1.6 * len(columns), 1.2 + 0.42 * len(variants)))
    panels = ((axes[0], entropy, dict(vmin=0.0, vmax=1.0), "{:.2f}",
               "worst-layer entropy H (entropy collapse -> 0)"),
              (axes[1], residual, dict(norm=LogNorm(vmin=1e-8, vmax=1.0)), "{:.0e}",
               "final res(X) (rank collapse -> 0)"))
    for axis, values, scale, label, title in panels:
        image = axis.imshow(values, cmap="viridis", aspect="auto", **scale)
        axis.set_xticks(range(len(columns)), labels, fontsize=8)
        axis.set_yticks(range(len(variants)), variants, fontsize=8)
        axis.set_title(title, fontsize=9)
        for row, line in enumerate(values):
            for column, value in enumerate(line):
                if math.isfinite(value):
                    axis.text(column, row, label.format(value), ha="center", va="center",
                              fontsize=7, color="white" if value < (0.5 if label == "{:.2f}"
                                                                    else 1e-4) else "black")
        figure.colorbar(image, ax=axis, fraction=0.05)
    figure.tight_layout()
    return _save(plt, figure, path)


def _save(plt, figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _evenly(items: list, count: int) -> list:
    """At most ``count`` items, evenly spaced, first and last included."""
    if len(items) <= count:
        return items
    return [items[round(i * (len(items) - 1) / (count - 1))] for i in range(count)]


def plot_attention_maps(maps: dict[str, torch.Tensor], path: Path, title: str = "",
                        max_layers: int = 6, max_heads: int = 8) -> Path:
    """Attention maps (H, Nq, Nk) per layer (rows, evenly chosen) and head (columns).

    ``maps`` as :func:`robust_attn.health.monitor.attention_maps` returns them; each
    panel is one head's weights, queries down, keys across, on a colour scale
    from 0 to that panel's largest weight (its colourbar beside it).
    """
    plt = pyplot()
    layers = _evenly(list(maps), max_layers)
    heads = min(max_heads, max(maps[name].shape[0] for name in layers))
    figure, axes = plt.subplots(len(layers), heads, figsize=(1.9 * heads + 1, 1.9 * len(layers)),
                                squeeze=False)
    for row, name in enumerate(layers):
        weights = maps[name].detach().float().cpu()
        for head in range(heads):
            axis = axes[row, head]
            axis.set(xticks=[], yticks=[])
            if head >= weights.shape[0]:
                axis.axis("off")
                continue
            panel = weights[head]
            largest = panel.max().item()
            image = axis.imshow(panel.numpy(), cmap="viridis", vmin=0.0,
                                vmax=max(largest, 1e-12), interpolation="nearest")
            figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
            if row == 0:
                axis.set_title(f"head {head}", fontsize=9)
        axes[row, 0].set_ylabel(name, fontsize=8)
    figure.suptitle(title or "attention maps (queries down, keys across)", fontsize=10)
    figure.tight_layout()
    return _save(plt, figure, path)


HEALTH_CURVES = (("entropy", "attention entropy (mean over heads)", "linear"),
                 ("max_logit", "largest attention logit (max over heads)", "linear"),
                 ("sink_mass", "attention on the first key (mean over heads)", "linear"),
                 ("input_residual", "res(X) of the tokens entering", "log"),
                 ("grad_norm", "gradient norm", "log"))


def _layer_curve(series, metric: str) -> list[float]:
    """A layer's series: per-head metrics reduced over heads (max for logits, else the mean)."""
    from ..health.monitor.report import HEAD_METRICS

    values = getattr(series, metric)
    if metric not in HEAD_METRICS:
        return values
    reduce = max if metric == "max_logit" else (lambda heads: sum(heads) / len(heads))
    return [reduce(heads) if all(map(math.isfinite, heads)) else math.nan for heads in values]


def plot_health_curves(report, path: Path, curves=HEALTH_CURVES,
                       marks: dict[str, int] | None = None) -> Path:
    """Per-layer health over training from a :class:`~robust_attn.health.monitor.MonitorReport`:
    one panel per metric (colour = depth) and the loss at every step. marks: label -> step,
    drawn as a dashed vertical line in every panel (e.g. the first step of each warning)."""
    plt = pyplot()
    columns = 3
    rows = math.ceil((len(curves) + 1) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.6 * columns, 3.4 * rows), squeeze=False)
    colours = plt.get_cmap("viridis")
    count = max(len(report.layers) - 1, 1)
    panels = list(axes.flat)
    for axis, (metric, label, scale) in zip(panels, curves, strict=False):
        for index, series in enumerate(report.layers):
            curve = _layer_curve(series, metric)
            if scale == "log":
                curve = [max(value, 1e-12) for value in curve]
            axis.plot(report.steps, curve, color=colours(index / count), linewidth=1)
        axis.set(title=label, xlabel="step", yscale=scale)
    loss_axis = panels[len(curves)]
    steps = [step for step, loss in enumerate(report.losses) if loss is not None]
    loss_axis.plot(steps, [report.losses[step] for step in steps], color="black", linewidth=1)
    loss_axis.set(title="loss (every step)", xlabel="step")
    marked = dict(sorted((marks or {}).items(), key=lambda item: item[1]))
    lines = plt.get_cmap("tab10")
    for number, (label, step) in enumerate(marked.items()):
        for axis in panels[:len(curves) + 1]:
            axis.axvline(step, color=lines(number % 10), linestyle="--", linewidth=1,
                         label=f"{label} ({step})")
    if marked:
        loss_axis.legend(fontsize=7, title="first warning", title_fontsize=7)
    for axis in panels[len(curves) + 1:]:
        axis.axis("off")
    figure.tight_layout(rect=(0, 0, 0.93, 1))
    mappable = plt.cm.ScalarMappable(cmap=colours, norm=plt.Normalize(1, len(report.layers)))
    figure.colorbar(mappable, cax=figure.add_axes((0.945, 0.15, 0.012, 0.7)), label="layer")
    return _save(plt, figure, path)


def _index(values, grid) -> list[float]:
    """Positions of ``values`` on an index axis whose ticks are ``grid`` (log-linear for beta)."""
    import numpy as np

    return np.interp(values, grid, range(len(grid))).tolist()


def _theory_boundaries(plt, axis, diagram, resolution: int = 80) -> None:
    """The theory's region boundaries on a fine grid, drawn in the diagram's index axes."""
    import numpy as np

    from .diagnostics import theory_health

    log_betas = np.log(diagram.betas)
    betas = np.exp(np.linspace(log_betas[0], log_betas[-1], resolution))
    alphas = np.linspace(diagram.alphas[0], diagram.alphas[-1], resolution)
    verdicts = list(VERDICT_COLOURS)
    codes = np.array([[verdicts.index(theory_health(beta, alpha, diagram.architecture,
                                                    diagram.input_overlap).verdict)
                       for beta in betas] for alpha in alphas])
    x = _index(np.log(betas), log_betas)
    y = _index(alphas, diagram.alphas)
    for code in np.unique(codes):
        axis.contour(x, y, (codes == code).astype(float), levels=[0.5], colors="black",
                     linewidths=1.5)


def plot_trainability_diagrams(diagrams, path: Path) -> Path:
    """One panel per :class:`~robust_attn.studies.diagnostics.TrainabilityDiagram`: cells coloured by the
    measured verdict, the theory's boundaries (black lines) where the diagram has theory, and an x
    on each cell where measurement and theory disagree."""
    from matplotlib.patches import Patch

    plt = pyplot()
    columns = min(len(diagrams), 3)
    rows = math.ceil(len(diagrams) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 4.2 * rows), squeeze=False)
    verdicts = list(VERDICT_COLOURS)
    colours = plt.matplotlib.colors.ListedColormap(list(VERDICT_COLOURS.values()))
    for axis, diagram in zip(axes.flat, diagrams, strict=False):
        grid = [[verdicts.index(diagram.cell(beta, alpha).verdict) for beta in diagram.betas]
                for alpha in diagram.alphas]
        axis.imshow(grid, cmap=colours, vmin=-0.5, vmax=len(verdicts) - 0.5, origin="lower",
                    aspect="auto", interpolation="nearest")
        if any(cell.theory is not None for cell in diagram.cells):
            _theory_boundaries(plt, axis, diagram)
            wrong = diagram.disagreements()
            axis.scatter(_index([c.beta for c in wrong], diagram.betas),
                         _index([c.alpha for c in wrong], diagram.alphas),
                         marker="x", color="white", s=25, linewidths=1.2)
        a = diagram.architecture
        axis.set(title=f"{diagram.variant}: {a.norm}-LN, depth {a.depth}, healthy "
                       f"{diagram.healthy_share():.0%}",
                 xticks=range(len(diagram.betas)), yticks=range(len(diagram.alphas)),
                 xlabel="beta (logit std / sqrt(log N))", ylabel="residual strength alpha")
        axis.set_xticklabels([f"{b:g}" for b in diagram.betas], fontsize=7, rotation=45)
        axis.set_yticklabels([f"{v:g}" for v in diagram.alphas], fontsize=8)
    for axis in list(axes.flat)[len(diagrams):]:
        axis.axis("off")
    handles = [Patch(color=colour, label=name) for name, colour in VERDICT_COLOURS.items()]
    handles.append(plt.Line2D([], [], color="black", label="theory (Giorlandino & Goldt 2025)"))
    handles.append(plt.Line2D([], [], color="white", marker="x", markeredgecolor="black",
                              linestyle="", label="theory disagrees"))
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8)
    figure.tight_layout(rect=(0, 0.06, 1, 1))
    return _save(plt, figure, path)

"""matplotlib, imported only when a picture is asked for (the ``plot`` extra)."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or an ImportError saying how to get it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("pictures need matplotlib: pip install 'robust-attn[plot]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_stack_health(reports, path: Path) -> Path:
    """Per-layer entropy (top) and res(X) (bottom), attention-only and residual stacks side by side;
    colour = variant, line style = query/key weight scale."""
    plt = pyplot()
    variants = list(dict.fromkeys(r.setting.variant for r in reports))
    scales = sorted({r.setting.qk_scale for r in reports})
    palette = plt.get_cmap("tab20").colors
    colours = dict(zip(variants, palette[0::2] + palette[1::2]))  # distinct shades first
    styles = dict(zip(scales, ["-", "--", ":", "-."] * len(scales)))
    figure, axes = plt.subplots(2, 2, figsize=(13, 8), sharex=True)
    for column, residual in enumerate((False, True)):
        entropy_axis, residual_axis = axes[0, column], axes[1, column]
        for report in (r for r in reports if r.setting.residual == residual):
            setting, layers = report.setting, report.layers
            style = dict(color=colours[setting.variant], linestyle=styles[setting.qk_scale])
            depth = [layer.layer for layer in layers]
            entropy_axis.plot(depth, [layer.entropy for layer in layers], **style)
            residual_axis.plot(depth, [max(layer.residual, 1e-12) for layer in layers], **style)
        stack = "with residual" if residual else "attention only"
        entropy_axis.set(title=f"{stack}: entropy (collapse -> 0)", ylim=(-0.02, 1.02),
                         ylabel="normalised attention entropy")
        residual_axis.set(title=f"{stack}: res(X) (rank collapse -> 0)", yscale="log",
                          xlabel="layer", ylabel="res(X)")
    handles = [plt.Line2D([], [], color=colours[v], label=v) for v in variants] + \
        [plt.Line2D([], [], color="black", linestyle=styles[s], label=f"sqk={s:g}") for s in scales]
    figure.legend(handles=handles, loc="center right", fontsize=8)
    figure.tight_layout(rect=(0, 0, 0.87, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path

"""Attention health of a model's RobustAttention modules, as flat numbers for logs and tables.

Read after a forward run under ``robust_attn.health_probe()``: every
RobustAttention then holds its :class:`robust_attn.AttentionHealth` in
``.health``. Worst-layer summaries (the collapse that matters is the worst one):

    entropy_min    min over layers of the mean normalised attention entropy (0: one-hot)
    entropy_mean   mean over layers of it
    row_entropy_min  the lowest entropy of any sampled query row
    max_logit      the largest attention logit of any layer
    residual_min   min over layers of res(X) of the attention output (0: rank collapse)
    sink_mass_max  the largest mean attention on the first key
    nonfinite      non-finite values in q, k, v and outputs, all layers
"""

from __future__ import annotations

from torch import nn

from robust_attn import AttentionHealth, RobustAttention


def attention_health(model: nn.Module) -> dict[str, AttentionHealth]:
    """name -> the latest health of every RobustAttention of ``model`` that has one."""
    return {name: module.health for name, module in model.named_modules()
            if isinstance(module, RobustAttention) and module.health is not None}


def layer_rows(healths: dict[str, AttentionHealth]) -> list[dict[str, object]]:
    """One row per layer: mean over heads of each per-head metric."""
    return [{"layer": name, "entropy": h.entropy.mean().item(),
             "min_entropy": h.min_entropy.min().item(), "max_logit": h.max_logit.max().item(),
             "residual": h.residual.mean().item(), "sink_mass": h.sink_mass.mean().item()}
            for name, h in healths.items()]


def summarize(healths: dict[str, AttentionHealth]) -> dict[str, float]:
    """Worst-layer summary (module docstring); empty when no layer has health."""
    rows = layer_rows(healths)
    if not rows:
        return {}
    return {
        "entropy_min": min(row["entropy"] for row in rows),
        "entropy_mean": sum(row["entropy"] for row in rows) / len(rows),
        "row_entropy_min": min(row["min_entropy"] for row in rows),
        "max_logit": max(row["max_logit"] for row in rows),
        "residual_min": min(row["residual"] for row in rows),
        "sink_mass_max": max(row["sink_mass"] for row in rows),
        "nonfinite": float(sum(sum(int(v) for v in h.nonfinite.values())
                               for h in healths.values())),
    }

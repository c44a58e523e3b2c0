"""What the monitor gathered: per-layer, per-head series over the sampled steps, and the loss.

Plain Python numbers (floats, nan where a value was not available), so a
report pickles, compares and goes to JSON (:meth:`MonitorReport.to_dict`) or
CSV (:meth:`MonitorReport.to_csv`) without torch.
"""

from __future__ import annotations

import csv
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

# Quantities with one value per head at each sampled step (AttentionHealth's fields).
HEAD_METRICS = ("entropy", "min_entropy", "sink_mass", "max_logit", "head_cosine",
                "head_residual")
# Quantities with one value per layer at each sampled step.
LAYER_METRICS = ("input_residual", "input_cosine", "branch_gain", "map_similarity",
                 "grad_norm", "nonfinite")


@dataclass
class LayerSeries:
    """One attention module's health at each sampled step (index i = ``MonitorReport.steps[i]``).

    Per head, lists of H values per step:
        entropy: mean normalised attention entropy (1 uniform, 0 one-hot).
        min_entropy: lowest normalised entropy of any sampled query row.
        sink_mass: mean attention on the first key.
        max_logit: largest pre-softmax attention logit.
        head_cosine, head_residual: token cosine similarity and res(X) of the head's output.
    Per layer, one value per step:
        input_residual, input_cosine: res(X) and token cosine similarity of the
            tokens entering the module (after the block's norm in a pre-LN block).
        branch_gain: ||Attn(x)||_F / ||x||_F, how much the module's output weighs
            against its input.
        map_similarity: mean over heads of the best centred cosine with a head
            of the attention call before it in the same forward (nan for the first).
        grad_norm: L2 norm of the gradients of the module's parameters.
        nonfinite: non-finite values in its q, k, v and output.
    """

    name: str
    heads: int
    explicit_sink: bool = False
    entropy: list[list[float]] = field(default_factory=list)
    min_entropy: list[list[float]] = field(default_factory=list)
    sink_mass: list[list[float]] = field(default_factory=list)
    max_logit: list[list[float]] = field(default_factory=list)
    head_cosine: list[list[float]] = field(default_factory=list)
    head_residual: list[list[float]] = field(default_factory=list)
    input_residual: list[float] = field(default_factory=list)
    input_cosine: list[float] = field(default_factory=list)
    branch_gain: list[float] = field(default_factory=list)
    map_similarity: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    nonfinite: list[float] = field(default_factory=list)

    def head_series(self, metric: str, head: int) -> list[float]:
        """One head's values of a per-head metric over the sampled steps."""
        return [values[head] for values in getattr(self, metric)]

    def summary(self) -> dict[str, dict[str, list[float] | float]]:
        """Over the sampled steps: last, mean, min and max of each metric (per head if per head)."""
        summary = {}
        for metric in HEAD_METRICS:
            per_head = [self.head_series(metric, head) for head in range(self.heads)]
            summary[metric] = {name: [reduce(series) for series in per_head]
                               for name, reduce in _REDUCTIONS.items()}
        for metric in LAYER_METRICS:
            series = getattr(self, metric)
            summary[metric] = {name: reduce(series) for name, reduce in _REDUCTIONS.items()}
        return summary


def _finite(series: list[float]) -> list[float]:
    return [value for value in series if math.isfinite(value)]


def _reduce(function):
    def reduce(series: list[float]) -> float:
        finite = _finite(series)
        return function(finite) if finite else math.nan

    return reduce


_REDUCTIONS = {"last": lambda series: series[-1] if series else math.nan,
               "mean": _reduce(statistics.fmean), "min": _reduce(min), "max": _reduce(max)}


@dataclass
class MonitorReport:
    """Everything a :class:`~robust_attn.monitor.HealthMonitor` gathered.

    every: the sampling period; steps: the sampled step numbers (0-based,
    counted by ``step()`` calls); losses: the loss fed at every step (None when
    none was); layers: one series per attention module, in the model's order.
    """

    every: int
    steps: list[int] = field(default_factory=list)
    losses: list[float | None] = field(default_factory=list)
    layers: list[LayerSeries] = field(default_factory=list)

    def layer(self, name: str) -> LayerSeries:
        for series in self.layers:
            if series.name == name:
                return series
        raise KeyError(f"no attention module named {name!r}; "
                       f"monitored: {[s.name for s in self.layers]}")

    def to_dict(self) -> dict:
        """Plain lists and numbers for any logger or JSON: the series and each layer's summary."""
        report = asdict(self)
        for series, layer in zip(self.layers, report["layers"], strict=True):
            layer["summary"] = series.summary()
        return report

    def to_csv(self, path: str | Path) -> Path:
        """One row per sampled step, layer and head: the per-head metrics, the layer's, the loss.

        Columns: step, layer, head, loss, then HEAD_METRICS, then LAYER_METRICS
        (a layer's values repeat on each of its heads' rows). The loss of every
        step, sampled or not, is in :attr:`losses`.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["step", "layer", "head", "loss", *HEAD_METRICS, *LAYER_METRICS])
            for index, step in enumerate(self.steps):
                loss = self.losses[step] if step < len(self.losses) else None
                for series in self.layers:
                    layer_values = [getattr(series, metric)[index] for metric in LAYER_METRICS]
                    for head in range(series.heads):
                        head_values = [getattr(series, metric)[index][head]
                                       for metric in HEAD_METRICS]
                        writer.writerow([step, series.name, head, loss, *head_values,
                                         *layer_values])
        return path

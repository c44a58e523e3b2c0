"""What the monitor gathered: per-layer, per-head series over the sampled steps, and the loss.

Plain Python numbers (floats, nan where a value was not available), so a
report pickles, compares and goes to JSON (:meth:`MonitorReport.to_dict`) or
CSV (:meth:`MonitorReport.to_csv`) without torch.

A :class:`~robust_attn.health.monitor.HealthMonitor` only ever appends to its series,
so the report it returns shares them: each series of that report is a
:class:`SeriesSnapshot`, a read-only view of the first values, as many as there
were when the report was taken. Taking a report costs the same at step 10 and
at step 10,000, and later steps do not change it.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from itertools import islice
from pathlib import Path

# Quantities with one value per head at each sampled step (AttentionHealth's fields).
HEAD_METRICS = ("entropy", "min_entropy", "sink_mass", "max_logit", "head_cosine",
                "head_residual")
# Quantities with one value per layer at each sampled step.
LAYER_METRICS = ("input_residual", "input_cosine", "branch_gain", "map_similarity",
                 "grad_norm", "nonfinite")


class SeriesSnapshot(Sequence):
    """The first ``length`` values of an append-only list, read-only: a report's series shared
    with the monitor that keeps appending to the list.

    Behaves as a list of those values: len, indexing, slices (plain lists), iteration, ``==``
    with lists. A value that is itself a list (one per head) is handed out as a copy, so nothing
    done to a snapshot reaches the monitor or another snapshot. Pickling and ``copy.deepcopy``
    give a plain list.
    """

    __slots__ = ("_values", "_length")

    def __init__(self, values: list, length: int):
        self._values, self._length = values, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [_copy(self._values[i]) for i in range(self._length)[index]]
        return _copy(self._values[range(self._length)[index]])

    def __iter__(self) -> Iterator:
        return map(_copy, islice(self._values, self._length))

    def __eq__(self, other) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(other) == self._length and all(
            a is b or a == b for a, b in zip(self, other, strict=True))

    __hash__ = None

    def __reduce__(self):
        return list, (list(self),)

    def __repr__(self) -> str:
        return repr(list(self))


def _copy(value):
    return list(value) if isinstance(value, list) else value


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
    """Everything a :class:`~robust_attn.health.monitor.HealthMonitor` gathered.

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
        return {"every": self.every, "steps": list(self.steps), "losses": list(self.losses),
                "layers": [{**{f.name: _plain(getattr(series, f.name)) for f in fields(series)},
                            "summary": series.summary()} for series in self.layers]}

    def snapshot(self) -> MonitorReport:
        """This report as it stands, sharing its lists (which must only ever be appended to):
        each series a :class:`SeriesSnapshot` of the values so far, whatever their number."""
        def view(values: list) -> SeriesSnapshot:
            return SeriesSnapshot(values, len(values))

        return MonitorReport(self.every, view(self.steps), view(self.losses), [
            replace(series, **{metric: view(getattr(series, metric))
                               for metric in HEAD_METRICS + LAYER_METRICS})
            for series in self.layers])

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

    def truncated(self, samples: int) -> MonitorReport:
        """The report as it stood right after its ``samples``-th sampled step: that many samples,
        and the losses of the steps up to and including that step (for replaying warnings)."""
        if isinstance(samples, bool) or not isinstance(samples, int) or \
                not 0 <= samples <= len(self.steps):
            raise ValueError(f"samples={samples!r}: expected an integer in 0..{len(self.steps)}")
        last = self.steps[samples - 1] + 1 if samples else 0
        return MonitorReport(self.every, self.steps[:samples], self.losses[:last],
                             [_slice_series(series, 0, samples) for series in self.layers])

    def since(self, step: int) -> MonitorReport:
        """The samples at steps >= ``step``, and the losses of earlier steps blanked (None):
        what rules with a warm-up see."""
        first = next((i for i, s in enumerate(self.steps) if s >= step), len(self.steps))
        losses = [None if i < step else loss for i, loss in enumerate(self.losses)]
        return MonitorReport(self.every, self.steps[first:], losses,
                             [_slice_series(series, first, len(self.steps))
                              for series in self.layers])

    @classmethod
    def from_csv(cls, path: str | Path, losses: list[float | None] | None = None,
                 explicit_sink: frozenset[str] = frozenset()) -> MonitorReport:
        """Read back what :meth:`to_csv` wrote (a finished run's ``health.csv``).

        losses: the loss of every step (e.g. from the run's train.csv); without
        them only the sampled steps' losses (the CSV's loss column) are known.
        explicit_sink: names of the layers that have sink keys (not in the CSV).
        ``every`` is the gap between the first two sampled steps (1 with fewer).
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"path={str(path)!r}: no such health.csv")
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
        expected = {"step", "layer", "head", "loss", *HEAD_METRICS, *LAYER_METRICS}
        if not rows or not expected <= set(rows[0]):
            missing = sorted(expected - set(rows[0])) if rows else "every row"
            raise ValueError(f"path={str(path)!r} is not a HealthMonitor CSV: missing {missing}")
        steps = list(dict.fromkeys(int(row["step"]) for row in rows))
        names = list(dict.fromkeys(row["layer"] for row in rows))
        heads = {name: 1 + max(int(r["head"]) for r in rows if r["layer"] == name)
                 for name in names}
        layers = {name: LayerSeries(name, heads[name], explicit_sink=name in explicit_sink)
                  for name in names}
        index = {step: i for i, step in enumerate(steps)}
        for series in layers.values():
            for metric in HEAD_METRICS:
                setattr(series, metric, [[math.nan] * series.heads for _ in steps])
            for metric in LAYER_METRICS:
                setattr(series, metric, [math.nan] * len(steps))
        sampled_losses: dict[int, float | None] = {}
        for row in rows:
            series, i, head = layers[row["layer"]], index[int(row["step"])], int(row["head"])
            for metric in HEAD_METRICS:
                getattr(series, metric)[i][head] = float(row[metric])
            for metric in LAYER_METRICS:
                getattr(series, metric)[i] = float(row[metric])
            sampled_losses[int(row["step"])] = float(row["loss"]) if row["loss"] else None
        if losses is None:
            losses = [sampled_losses.get(step) for step in range(steps[-1] + 1)]
        every = steps[1] - steps[0] if len(steps) > 1 else 1
        return cls(every, steps, list(losses), list(layers.values()))


def _plain(value):
    """A series as nested plain lists (JSON); names, head counts and flags as they are."""
    return [_copy(item) for item in value] if isinstance(value, (list, SeriesSnapshot)) else value


def _slice_series(series: LayerSeries, start: int, stop: int) -> LayerSeries:
    return replace(series, **{metric: getattr(series, metric)[start:stop]
                              for metric in HEAD_METRICS + LAYER_METRICS})

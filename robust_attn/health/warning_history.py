"""What the early-warning rules read, kept up to date one sample and one loss at a time.

The rules (:mod:`robust_attn.health.early_warnings`) need, per series, the latest
finite value and the last few values (the evidence and the trend window), and,
over the whole run, a few statistics: a head's median entropy, a layer's median
gradient norm before its latest, the loss steps above the robust band, the
non-finite losses. :class:`WarningHistory` keeps exactly those as the report
grows, so reading them costs the same at sample 10 and at sample 10,000; each
new sample costs O(layers x heads), plus O(log n) for the two running medians
(:class:`RunningMedian`, two heaps). The definitions are the rules' (module
docstring of early_warnings); tests/test_early_warnings.py compares every
warning with a from-scratch computation on random histories.

A history sees the samples at steps >= ``start`` and the losses of those steps
(earlier losses count as not fed): the rules' warm-up.
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .early_warnings import Thresholds
    from .monitor.report import MonitorReport


# The series the rules read (of MonitorReport's HEAD_METRICS and LAYER_METRICS).
HEAD_METRICS = ("entropy", "sink_mass", "max_logit")
LAYER_METRICS = ("input_residual", "input_cosine", "branch_gain", "map_similarity", "grad_norm",
                 "nonfinite")


class RunningMedian:
    """``statistics.median`` of the values pushed so far (the mean of the two middle values for
    an even count): the lower half in a max-heap, the upper half in a min-heap, O(log n) a push."""

    __slots__ = ("_low", "_high")

    def __init__(self):
        self._low: list[float] = []  # negated: a max-heap of the lower half
        self._high: list[float] = []

    def __len__(self) -> int:
        return len(self._low) + len(self._high)

    def push(self, value: float) -> None:
        if not self._low or value <= -self._low[0]:
            heapq.heappush(self._low, -value)
        else:
            heapq.heappush(self._high, value)
        if len(self._low) > len(self._high) + 1:
            heapq.heappush(self._high, -heapq.heappop(self._low))
        elif len(self._high) > len(self._low):
            heapq.heappush(self._low, -heapq.heappop(self._high))

    def median(self) -> float | None:
        """None when empty."""
        if not self._low:
            return None
        if len(self._low) > len(self._high):
            return -self._low[0]
        return (-self._low[0] + self._high[0]) / 2


class Tail:
    """The last ``length`` values of a series and its latest finite value (None before one)."""

    __slots__ = ("values", "latest")

    def __init__(self, length: int):
        self.values: deque[float] = deque(maxlen=length)
        self.latest: float | None = None

    def push(self, value: float) -> None:
        self.values.append(value)
        if math.isfinite(value):
            self.latest = value

    def last(self, count: int) -> list[float]:
        return list(self.values)[-count:]


class HeadTails:
    """A per-head metric's last ``length`` rows (one value per head each) and each head's latest
    finite value: one append a sample, not one per head."""

    __slots__ = ("rows", "latest")

    def __init__(self, heads: int, length: int):
        self.rows: deque[list[float]] = deque(maxlen=length)
        self.latest: list[float | None] = [None] * heads

    def push(self, row: list[float]) -> None:
        self.rows.append(row)
        latest = self.latest
        for head, value in enumerate(row):
            if math.isfinite(value):
                latest[head] = value

    def head(self, head: int) -> HeadTail:
        return HeadTail(self, head)


class HeadTail:
    """One head's view of :class:`HeadTails`, read like a :class:`Tail`."""

    __slots__ = ("tails", "index")

    def __init__(self, tails: HeadTails, index: int):
        self.tails, self.index = tails, index

    @property
    def latest(self) -> float | None:
        return self.tails.latest[self.index]

    def last(self, count: int) -> list[float]:
        return [row[self.index] for row in list(self.tails.rows)[-count:]]


def robust_edge(previous: Sequence[float], band: float) -> float:
    """Upper edge of the robust band over ``previous`` (nan entries ignored; nan when none left):

        edge = median + band * max(1.4826 * MAD, 1e-3 * |median|)

    (MAD = median absolute deviation, 1.4826 MAD estimates a Gaussian sigma: Hampel's robust
    z-score; the floor keeps a flat loss from flagging noise. Medians of an even count are the
    lower middle value, as torch.nanmedian's.)
    """
    finite = sorted(value for value in previous if math.isfinite(value))
    if not finite:
        return math.nan
    median = finite[(len(finite) - 1) // 2]
    deviations = sorted(abs(value - median) for value in finite)
    mad = deviations[(len(deviations) - 1) // 2]
    return median + band * max(1.4826 * mad, 1e-3 * abs(median))


class LayerHistory:
    """One attention module's tails (per head for the per-head metrics), its running median
    entropy per head, and its gradient norms: the latest and the median of the finite earlier."""

    def __init__(self, name: str, heads: int, explicit_sink: bool, length: int):
        self.name, self.heads, self.explicit_sink = name, heads, explicit_sink
        self.head_tails = {metric: HeadTails(heads, length) for metric in HEAD_METRICS}
        self.tails = {metric: Tail(length) for metric in LAYER_METRICS}
        self.entropy_medians = [RunningMedian() for _ in range(heads)]
        self.grad_norm: float | None = None  # the latest, finite or not
        self.earlier_grad_norms = RunningMedian()  # the finite ones before it
        self.earlier_finite_grad_norms = 0

    def push(self, series, index: int) -> None:
        for metric in HEAD_METRICS:
            self.head_tails[metric].push(getattr(series, metric)[index])
        for median, value in zip(self.entropy_medians, self.head_tails["entropy"].rows[-1],
                                 strict=True):
            if math.isfinite(value):
                median.push(value)
        for metric in LAYER_METRICS:
            self.tails[metric].push(getattr(series, metric)[index])
        if self.grad_norm is not None and math.isfinite(self.grad_norm):
            self.earlier_grad_norms.push(self.grad_norm)
        self.grad_norm = series.grad_norm[index]


class WarningHistory:
    """The statistics the rules read, for the samples at steps >= ``start`` (see the module)."""

    def __init__(self, t: Thresholds, start: int = 0):
        self.t, self.start = t, start
        self.length = max(t.evidence_samples, t.trend_samples)
        self.samples = 0
        self.steps: deque[int] = deque(maxlen=self.length)
        self.layers: list[LayerHistory] = []
        self.sink_rates = Tail(t.evidence_samples)
        self.losses = 0  # losses seen (fed or not)
        self.loss_window: deque[float] = deque(maxlen=t.loss_window)  # nan where none/non-finite
        self.spikes = 0
        self.recent_spikes: deque[tuple[int, float, float]] = deque(maxlen=t.evidence_samples)
        self.finite_losses: deque[tuple[int, float]] = deque(maxlen=t.oscillation_window)
        self.nonfinite_losses = 0
        self.first_nonfinite_losses: list[tuple[int, float]] = []

    def push_loss(self, loss: float | None) -> None:
        """The loss of the next step (None: none fed); before ``start`` it counts as none."""
        step, t = self.losses, self.t
        self.losses += 1
        if step < self.start:
            loss = None
        if loss is not None and not math.isfinite(loss):
            self.nonfinite_losses += 1
            if len(self.first_nonfinite_losses) < t.evidence_samples:
                self.first_nonfinite_losses.append((step, loss))
        known = sum(math.isfinite(value) for value in self.loss_window)
        if loss is not None and known >= t.loss_min_history:
            edge = robust_edge(self.loss_window, t.loss_band)
            if loss > edge:
                self.spikes += 1
                self.recent_spikes.append((step, loss, edge))
        finite = loss is not None and math.isfinite(loss)
        self.loss_window.append(loss if finite else math.nan)
        if finite:
            self.finite_losses.append((step, loss))

    def push_sample(self, report: MonitorReport, index: int) -> None:
        """The report's sample ``index`` (its losses up to that step pushed first)."""
        if report.steps[index] < self.start:
            return
        if not self.layers:
            self.layers = [LayerHistory(series.name, series.heads, series.explicit_sink,
                                        self.length) for series in report.layers]
        self.samples += 1
        self.steps.append(report.steps[index])
        for layer, series in zip(self.layers, report.layers, strict=True):
            layer.push(series, index)
        sinking = [layer for layer in self.layers if not layer.explicit_sink]
        if sinking:
            masses = torch.tensor([mass for layer in sinking
                                   for mass in layer.head_tails["sink_mass"].rows[-1]])
            masses = masses[masses.isfinite()]
            self.sink_rates.push((masses > self.t.sink_eps).float().mean().item()
                                 if masses.numel() else math.nan)

    def recent(self, tail: Tail | HeadTail) -> dict:
        """The last ``evidence_samples`` (step, value) pairs of ``tail`` as evidence."""
        count = self.t.evidence_samples
        return {"steps": list(self.steps)[-count:], "values": tail.last(count)}

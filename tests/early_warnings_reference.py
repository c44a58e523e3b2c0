"""The early-warning rules computed from scratch over a whole report: the definitions as first
written (robust_attn.health.early_warnings before its rules read the incremental
WarningHistory), kept as the independent reference the incremental rules are compared with.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Collection

import torch

from robust_attn.health.early_warnings import (
    IMMEDIATE,
    HealthWarning,
    Thresholds,
    _format,  # one fix: None printed, not a crash
    _warning,
    suggest,
)
from robust_attn.health.monitor.report import LayerSeries, MonitorReport


def _recent(steps: list[int], values: list[float], count: int) -> dict:
    """The last ``count`` (step, value) pairs as evidence."""
    return {"steps": list(steps[-count:]), "values": list(values[-count:])}


def _finite(values: list[float]) -> list[float]:
    return [value for value in values if math.isfinite(value)]


def _latest(values: list[float]) -> float | None:
    """The last finite value, or None."""
    return next((value for value in reversed(values) if math.isfinite(value)), None)


def _per_head(report: MonitorReport, metric: str):
    """(layer series, head, that head's values over the sampled steps) for every head."""
    for series in report.layers:
        for head in range(series.heads):
            yield series, head, series.head_series(metric, head)


def entropy_collapse(report: MonitorReport, t: Thresholds) -> list[HealthWarning]:
    """A head's latest mean normalised entropy below ``t.entropy_collapse``."""
    return [_warning("entropy_collapse", series.name, head,
                     f"{series.name} head {head}: attention entropy {value:.3f} < "
                     f"{t.entropy_collapse:g}", _recent(report.steps, values, t.evidence_samples))
            for series, head, values in _per_head(report, "entropy")
            if (value := _latest(values)) is not None and value < t.entropy_collapse]


def slope(steps: list[int], values: list[float]) -> float | None:
    """Least-squares slope of the finite values against their steps; None with fewer than 3.

    slope = sum_i (s_i - s_bar)(v_i - v_bar) / sum_i (s_i - s_bar)^2
    """
    pairs = [(s, v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)]
    if len(pairs) < 3:
        return None
    s_bar = sum(s for s, _ in pairs) / len(pairs)
    v_bar = sum(v for _, v in pairs) / len(pairs)
    spread = sum((s - s_bar) ** 2 for s, _ in pairs)
    return sum((s - s_bar) * (v - v_bar) for s, v in pairs) / spread if spread else None


def entropy_falling(report: MonitorReport, t: Thresholds) -> list[HealthWarning]:
    """A head's entropy falling fast against its own level: over the last ``t.trend_samples``
    samples, slope / m < -``t.entropy_fall_rate`` per step and the fitted fall > ``t.entropy_fall_min``
    x m, where m is the head's median entropy over the samples the rule sees (after the warm-up).
    Relative to the head's own history, so a head that is meant to be sharp is judged by its
    own scale."""
    warnings = []
    steps = report.steps[-t.trend_samples:]
    span = steps[-1] - steps[0] if steps else 0
    for series, head, values in _per_head(report, "entropy"):
        rate = slope(steps, values[-t.trend_samples:])
        history = _finite(values)
        level = statistics.median(history) if history else math.nan
        if rate is None or not level > 0:
            continue
        relative = rate / level
        if relative < -t.entropy_fall_rate and -relative * span > t.entropy_fall_min:
            warnings.append(_warning(
                "entropy_falling", series.name, head,
                f"{series.name} head {head}: attention entropy falling {-relative:.2g} of its "
                f"median {level:.3f} per step (> {t.entropy_fall_rate:g})",
                {**_recent(report.steps, values, t.evidence_samples), "slope_per_step": rate,
                 "median": level}))
    return warnings


def logit_growth(report: MonitorReport, t: Thresholds) -> list[HealthWarning]:
    """A head's latest largest attention logit above ``t.logit_bound``."""
    return [_warning("logit_growth", series.name, head,
                     f"{series.name} head {head}: largest attention logit {value:.1f} > "
                     f"{t.logit_bound:g}", _recent(report.steps, values, t.evidence_samples))
            for series, head, values in _per_head(report, "max_logit")
            if (value := _latest(values)) is not None and value > t.logit_bound]


def rank_collapse(report: MonitorReport, t: Thresholds) -> list[HealthWarning]:
    """Tokens entering a layer nearly identical: res below or mean cosine above its threshold."""
    warnings = []
    for series in report.layers:
        res, cosine = _latest(series.input_residual), _latest(series.input_cosine)
        if (res is not None and res < t.rank_residual) or \
                (cosine is not None and cosine > t.rank_cosine):
            evidence = _recent(report.steps, series.input_residual, t.evidence_samples)
            evidence["cosine"] = series.input_cosine[-t.evidence_samples:]
            warnings.append(_warning(
                "rank_collapse", series.name, None,
                f"{series.name}: tokens entering it have res {_format(res, '.2g')} (< "
                f"{t.rank_residual:g} collapses) and mean cosine {_format(cosine, '.4f')} (> "
                f"{t.rank_cosine:g} collapses)",
                evidence))
    return warnings


def attention_sink(report: MonitorReport, t: Thresholds) -> list[HealthWarning]:
    """Most heads sink: more than ``t.sink_share`` of heads put > ``t.sink_eps`` on the first key.

    Gu et al. (2025)'s Sink_1^eps (:func:`robust_attn.metrics.sink_rate`, eps = 0.3)
    over the heads of every layer that has no explicit sink key (for those,
    mass on the first key is the design).
    """
    layers = [series for series in report.layers if not series.explicit_sink and series.sink_mass]
    if not layers:
        return []
    rates = []
    for index in range(len(report.steps)):
        masses = torch.tensor([mass for series in layers for mass in series.sink_mass[index]])
        masses = masses[masses.isfinite()]
        rates.append((masses > t.sink_eps).float().mean().item() if masses.numel() else math.nan)
    rate = _latest(rates)
    if rate is None or rate <= t.sink_share:
        return []
    sinking = [f"{series.name}/{head}" for series in layers for head in range(series.heads)
               if (mass := _latest(series.head_series("sink_mass", head))) is not None
               and mass > t.sink_eps]
    return [_warning("attention_sink", None, None,
                     f"{rate:.0%} of heads put > {t.sink_eps:g} of their attention on the first "
                     f"key (> {t.sink_share:.0%})",
                     {**_recent(report.steps, rates, t.evidence_samples), "heads": sinking})]


def _loss_tensor(losses: list[float | None]) -> torch.Tensor:
    """float64 losses, nan where none was fed."""
    return torch.tensor([math.nan if loss is None else loss for loss in losses],
                        dtype=torch.float64)


def _finite_loss(loss: float | None) -> bool:
    return loss is not None and math.isfinite(loss)


def robust_band(losses: list[float | None], window: int, band: float) -> torch.Tensor:
    """Upper edge of the running robust band for each step (nan where there is no history yet).

    For step i, over the finite losses among the previous ``window`` steps::

        edge_i = median + band * max(1.4826 * MAD, 1e-3 * |median|)

    (MAD = median absolute deviation, 1.4826 MAD estimates a Gaussian sigma:
    Hampel's robust z-score; the floor keeps a flat loss from flagging noise.
    Medians of an even count are the lower middle value, as torch.nanmedian's.)
    """
    values = _loss_tensor(losses)
    values = torch.where(values.isfinite(), values, torch.nan)
    padded = torch.cat([torch.full((window,), torch.nan, dtype=torch.float64), values])
    history = padded.unfold(0, window, 1)[:-1]  # row i: the `window` steps before step i
    median = history.nanmedian(dim=1).values
    mad = (history - median[:, None]).abs().nanmedian(dim=1).values
    return median + band * torch.maximum(1.4826 * mad, 1e-3 * median.abs())


def loss_spike(report: MonitorReport, t: Thresholds) -> list[HealthWarning]:
    """Losses above the running robust band of the previous ``t.loss_window`` finite losses."""
    losses = report.losses
    if not losses:
        return []
    edge = robust_band(losses, t.loss_window, t.loss_band)
    finite = torch.tensor([_finite_loss(loss) for loss in losses], dtype=torch.long)
    seen = torch.cat([torch.zeros(1, dtype=torch.long), finite.cumsum(0)])
    known = seen[:-1] - seen[:-1].roll(t.loss_window).masked_fill(
        torch.arange(len(losses)) < t.loss_window, 0)  # finite losses among the previous window
    values = _loss_tensor(losses)
    spikes = ((values > edge) & (known >= t.loss_min_history)).nonzero().flatten().tolist()
    if not spikes:
        return []
    return [_warning("loss_spike", None, None,
                     f"loss spiked at {len(spikes)} step(s), latest step {spikes[-1]}: "
                     f"{losses[spikes[-1]]:.4g} > band {edge[spikes[-1]].item():.4g}",
                     {"steps": spikes[-t.evidence_samples:],
                      "values": [losses[i] for i in spikes[-t.evidence_samples:]],
                      "band": [edge[i].item() for i in spikes[-t.evidence_samples:]]})]


def loss_oscillation(report: MonitorReport, t: Thresholds) -> list[HealthWarning]:
    """The last losses alternate up and down, with changes large against the loss itself."""
    recent = [(step, loss) for step, loss in enumerate(report.losses)
              if _finite_loss(loss)][-t.oscillation_window:]
    if len(recent) < t.oscillation_window:
        return []
    losses = torch.tensor([loss for _, loss in recent], dtype=torch.float64)
    changes = losses.diff()
    flips = (changes[1:] * changes[:-1] < 0).double().mean().item()
    amplitude = changes.abs().mean().item() / max(losses.abs().median().item(), 1e-12)
    if flips < t.oscillation_flips or amplitude <= t.oscillation_amplitude:
        return []
    return [_warning("loss_oscillation", None, None,
                     f"loss oscillates: {flips:.0%} of the last changes flip sign, mean change "
                     f"{amplitude:.1%} of the loss",
                     {"steps": [step for step, _ in recent], "values": losses.tolist(),
                      "flips": flips, "relative_amplitude": amplitude})]


def divergence(report: MonitorReport, t: Thresholds) -> list[HealthWarning]:
    """A non-finite loss, or a layer whose latest probe counted non-finite q, k, v or output."""
    warnings = []
    bad = [step for step, loss in enumerate(report.losses)
           if loss is not None and not math.isfinite(loss)]
    if bad:
        warnings.append(_warning("divergence", None, None,
                                 f"non-finite loss at {len(bad)} step(s), first at step {bad[0]}",
                                 {"steps": bad[:t.evidence_samples],
                                  "values": [report.losses[s] for s in bad[:t.evidence_samples]]}))
    for series in report.layers:
        count = _latest(series.nonfinite)
        if count is not None and count > 0:
            warnings.append(_warning("divergence", series.name, None,
                                     f"{series.name}: {count:g} non-finite values in q, k, v or "
                                     "the attention output",
                                     _recent(report.steps, series.nonfinite, t.evidence_samples)))
    return warnings


def _gradient_norms(report: MonitorReport) -> list[tuple[LayerSeries, float]]:
    return [(series, norm) for series in report.layers
            if (norm := _latest(series.grad_norm)) is not None]


def vanishing_gradients(report: MonitorReport, t: Thresholds) -> list[HealthWarning]:
    """A layer's latest gradient norm below ``t.vanishing_ratio`` times the largest layer's, or 0.

    Relative, because the loss sets the gradients' scale: the layer learns
    that much slower than the fastest one (with SGD; Adam rescales, but
    cannot recover a direction lost in rounding).
    """
    norms = _gradient_norms(report)
    if not norms:
        return []
    largest = max(norm for _, norm in norms)
    return [_warning("vanishing_gradients", series.name, None,
                     f"{series.name}: gradient norm {norm:.2g} is < {t.vanishing_ratio:g} of the "
                     f"largest layer's ({largest:.2g})",
                     {**_recent(report.steps, series.grad_norm, t.evidence_samples),
                      "largest": largest})
            for series, norm in norms if norm == 0 or norm < t.vanishing_ratio * largest]


def exploding_gradients(report: MonitorReport, t: Thresholds) -> list[HealthWarning]:
    """A layer's latest gradient norm non-finite or > ``t.exploding_factor`` x its past median."""
    warnings = []
    for series in report.layers:
        if not series.grad_norm:
            continue
        latest, earlier = series.grad_norm[-1], _finite(series.grad_norm[:-1])
        median = statistics.median(earlier) if len(earlier) >= 3 else None
        if math.isinf(latest) or (math.isnan(latest) and earlier) or \
                (median is not None and latest > t.exploding_factor * median):
            warnings.append(_warning(
                "exploding_gradients", series.name, None,
                f"{series.name}: gradient norm {latest:.3g}, earlier median "
                f"{median if median is not None else math.nan:.3g}",
                {**_recent(report.steps, series.grad_norm, t.evidence_samples),
                 "earlier_median": median}))
    return warnings


def redundant_layer(report: MonitorReport, t: Thresholds) -> list[HealthWarning]:
    """A layer whose centred attention maps repeat the previous layer's (similarity > threshold)."""
    return [_warning("redundant_layer", series.name, None,
                     f"{series.name}: attention maps repeat the previous layer's (similarity "
                     f"{value:.3f} > {t.redundant_similarity:g})",
                     _recent(report.steps, series.map_similarity, t.evidence_samples))
            for series in report.layers
            if (value := _latest(series.map_similarity)) is not None
            and value > t.redundant_similarity]


def lazy_layer(report: MonitorReport, t: Thresholds) -> list[HealthWarning]:
    """A layer whose attention output is below ``t.lazy_gain`` of its input's norm."""
    return [_warning("lazy_layer", series.name, None,
                     f"{series.name}: attention output is {value:.2g} of its input (< "
                     f"{t.lazy_gain:g}): the branch contributes almost nothing",
                     _recent(report.steps, series.branch_gain, t.evidence_samples))
            for series in report.layers
            if (value := _latest(series.branch_gain)) is not None and value < t.lazy_gain]


RULES: dict[str, Callable[[MonitorReport, Thresholds], list[HealthWarning]]] = {
    "entropy_collapse": entropy_collapse, "entropy_falling": entropy_falling,
    "logit_growth": logit_growth, "rank_collapse": rank_collapse,
    "attention_sink": attention_sink, "loss_spike": loss_spike,
    "loss_oscillation": loss_oscillation, "divergence": divergence,
    "vanishing_gradients": vanishing_gradients, "exploding_gradients": exploding_gradients,
    "redundant_layer": redundant_layer, "lazy_layer": lazy_layer,
}


def _key(warning: HealthWarning) -> tuple:
    return warning.code, warning.layer, warning.head


def _fired(report: MonitorReport, t: Thresholds, codes: Collection[str]) -> list[HealthWarning]:
    """The rules' raw warnings: after the warm-up, except for the immediate codes."""
    warmed = report.since(t.warmup_steps) if t.warmup_steps else report
    return [warning for code in codes
            for warning in RULES[code](report if code in IMMEDIATE else warmed, t)]


def check(report: MonitorReport, thresholds: Thresholds | None = None,
          in_use: Collection[str] = (), codes: Collection[str] | None = None
          ) -> list[HealthWarning]:
    """The warnings ``report`` raises now, in the order of :data:`RULES`.

    A rule's warning counts when the rule fired for the same layer and head on
    each of the last ``thresholds.persistence`` sampled steps (hysteresis;
    immediate codes need once). in_use: presets the model already uses, left out
    of the suggestions. codes: only these rules (default all).
    """
    t = thresholds or Thresholds()
    codes = list(RULES) if codes is None else [code for code in RULES if code in codes]
    current = _fired(report, t, codes)
    for back in range(1, t.persistence):
        samples = len(report.steps) - back
        earlier = {_key(w) for w in _fired(report.truncated(samples), t, codes)} \
            if samples >= 1 else set()
        current = [w for w in current if w.code in IMMEDIATE or _key(w) in earlier]
    return [suggest(warning, in_use) for warning in current] if in_use else current

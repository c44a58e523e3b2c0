"""Early warnings: the signs of trouble the literature knows, read from a monitor's report.

Each rule reads a :class:`~robust_attn.health.monitor.MonitorReport` and returns
:class:`HealthWarning` values: a code, the layer and head (None where the
warning is about the whole model), the evidence (the recent values and the
steps they come from) and the presets that address it, best first. Level
rules judge the latest finite sampled value; trend rules the recent samples.

Codes, what fires them (fields of :class:`Thresholds`), and the source:

    entropy_collapse     a head's mean normalised entropy < entropy_collapse (Zhai et al. 2023)
    entropy_falling      least-squares slope of a head's entropy over the last
                         trend_samples samples, relative to the head's own median since
                         the warm-up, < -entropy_fall_rate per step, and the fitted fall
                         over those samples > entropy_fall_min of that median (Zhai et al. 2023)
    logit_growth         a head's largest attention logit > logit_bound (Wortsman et al. 2023)
    rank_collapse        tokens entering a layer: res < rank_residual or mean cosine >
                         rank_cosine (Dong et al. 2021; Noci et al. 2022)
    attention_sink       > sink_share of heads put > sink_eps of their attention on the
                         first key (Gu et al. 2025's Sink^eps with their eps = 0.3)
    loss_spike           loss > median + loss_band * 1.4826 * MAD of the previous
                         loss_window finite losses (Hampel's robust z-score)
    loss_oscillation     over the last oscillation_window losses, >= oscillation_flips of
                         successive changes flip sign and the mean change is >
                         oscillation_amplitude of the median loss
    divergence           a non-finite loss, or non-finite q, k, v or output in a layer
    vanishing_gradients  a layer's gradient norm < vanishing_ratio x the largest layer's,
                         or 0 (Noci et al. 2022: rank collapse makes gradients vanish)
    exploding_gradients  a layer's gradient norm non-finite or > exploding_factor x its
                         median over earlier samples
    redundant_layer      a layer's centred attention maps repeat the previous layer's,
                         similarity > redundant_similarity (Bhojanapalli et al. 2021)
    lazy_layer           the attention output's norm < lazy_gain of its input's (He et al. 2024)

The defaults of :class:`Thresholds` are the values fitted on the calibration
runs (below; recipes/results/warning_evaluation/evaluation.json, "thresholds",
a test keeps them equal). They were fitted on small character LMs (4 layers,
width 64): for other models, pass your own :class:`Thresholds`. Gu et al.'s
eps = 0.3 is theirs; the rest are ours.

Warm-up and hysteresis (:func:`check`): every rule but ``divergence`` ignores
the samples and losses of the first ``Thresholds.warmup_steps`` steps (the
fast early learning, when entropy falls as a matter of course), and a warning
is raised only when its rule has fired, for the same layer and head, on each of
the last ``Thresholds.persistence`` sampled steps.

Trust: the defaults were fitted on the calibration split of a labelled corpus of
real-text training runs and scored on its held-out split
(recipes/warning_corpus.py, recipes/warning_evaluation.py,
recipes/results/warning_evaluation/). The codes in :data:`INFORMATIONAL` did not
reach the targets there (recall >= 90 % of failed runs warned before their
failure, median lead >= 20 % of the run, <= 5 % of healthy runs warned): their
warnings carry ``informational=True`` and say so when printed. Suggestions never
name a preset the model already uses (``check``'s ``in_use``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

import torch

from ..mitigations import MITIGATIONS as MITIGATION_CLASSES
from .warning_history import WarningHistory

if TYPE_CHECKING:
    from .monitor.report import MonitorReport


@dataclass(frozen=True)
class Thresholds:
    """Every threshold of the rules (see the module table); the defaults are the calibrated ones."""

    entropy_collapse: float = 0.2
    entropy_fall_rate: float = 0.003
    entropy_fall_min: float = 0.1
    trend_samples: int = 10
    logit_bound: float = 20.0
    rank_residual: float = 0.01
    rank_cosine: float = 0.99
    sink_eps: float = 0.3
    sink_share: float = 0.5
    loss_window: int = 50
    loss_min_history: int = 10
    loss_band: float = 4.0
    oscillation_window: int = 20
    oscillation_flips: float = 0.9
    oscillation_amplitude: float = 0.05
    vanishing_ratio: float = 0.01
    exploding_factor: float = 10.0
    redundant_similarity: float = 0.9
    lazy_gain: float = 0.001
    evidence_samples: int = 10
    warmup_steps: int = 0
    persistence: int = 1

    def __post_init__(self):
        for name, least in (("trend_samples", 1), ("loss_window", 1), ("oscillation_window", 1),
                            ("evidence_samples", 1), ("persistence", 1), ("loss_min_history", 0),
                            ("warmup_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name}={value!r}: expected an integer >= {least} (a count of "
                                 "samples, losses or steps)")


@dataclass(frozen=True)
class HealthWarning:
    """One warning. evidence: {"steps": [...], "values": [...]} plus rule-specific entries.

    mitigations: presets to try, best first (none the model already uses);
    advice: why they help, and what else to do; informational: the code did
    not reach the trust targets on held-out runs (:data:`INFORMATIONAL`).
    """

    code: str
    layer: str | None
    head: int | None
    message: str
    evidence: dict
    mitigations: tuple[str, ...]
    advice: str
    informational: bool = False

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        where = "" if self.layer is None else f" [{self.layer}" + \
            ("" if self.head is None else f" head {self.head}") + "]"
        label = " (informational: not validated as an early warning)" if self.informational else ""
        tries = f"; try {', '.join(self.mitigations)}" if self.mitigations else ""
        return f"{self.code}{where}{label}: {self.message}{tries}. {self.advice}"


# code -> advice that names no preset (the presets suggested, and why, are each mitigation's
# own: Mitigation.advice, gathered by suggestions()).
GENERAL_ADVICE: dict[str, str] = {
    'entropy_collapse': 'or lower the learning rate',
    'entropy_falling': 'as for entropy collapse, before it happens',
    'logit_growth': 'or lower the learning rate',
    'rank_collapse': 'check residual scaling too',
    'attention_sink': 'a sink is harmless in itself; act if streaming or quantisation suffer',
    'loss_spike': 'or lower the learning rate',
    'loss_oscillation': 'oscillation means the step is too large for the curvature: lower the learning rate',
    'divergence': 'restart from the last finite checkpoint with a lower learning rate',
    'vanishing_gradients': 'see which of the two is warned about beside it',
    'exploding_gradients': 'or clip gradients',
    'redundant_layer': 'a layer that stays redundant can share maps or be pruned (Bhojanapalli et al. 2021)',
    'lazy_layer': 'or pruned; if attention is near uniform, raise the q/k init scale',
}


def suggestions(code: str) -> dict[str, str]:
    """{preset: why it helps} for warning ``code``, best first, from the mitigations' advice."""
    ranked = sorted((mitigation.advice[code][0], mitigation.advice_preset,
                     mitigation.advice[code][1])
                    for mitigation in MITIGATION_CLASSES.values() if code in mitigation.advice)
    return {preset: why for _, preset, why in ranked}

# Codes that missed the trust targets on the held-out runs
# (recipes/results/warning_evaluation/evaluation.json, "informational"; a test keeps them equal).
INFORMATIONAL: frozenset[str] = frozenset({
    "attention_sink",
    "divergence",
    "entropy_falling",
    "exploding_gradients",
    "lazy_layer",
    "loss_oscillation",
    "loss_spike",
    "rank_collapse",
    "redundant_layer",
    "vanishing_gradients",
})

# Codes raised at once, without warm-up or hysteresis: a non-finite value is never noise.
IMMEDIATE: frozenset[str] = frozenset({"divergence"})


def _warning(code: str, layer: str | None, head: int | None, message: str,
             evidence: dict) -> HealthWarning:
    presets, advice = suggestions(code), GENERAL_ADVICE[code]
    return HealthWarning(code, layer, head, message, evidence, tuple(presets),
                         "; ".join([*presets.values(), advice]), code in INFORMATIONAL)


def suggest(warning: HealthWarning, in_use: Collection[str]) -> HealthWarning:
    """The warning with the presets in ``in_use`` (and their reasons) left out of its advice."""
    presets, advice = suggestions(warning.code), GENERAL_ADVICE[warning.code]
    kept = {name: why for name, why in presets.items() if name not in in_use}
    return replace(warning, mitigations=tuple(kept), advice="; ".join([*kept.values(), advice]))


def _per_head(history: WarningHistory, metric: str):
    """(layer, head, that head's tail of ``metric``) for every head."""
    for layer in history.layers:
        tails = layer.head_tails[metric]
        for head in range(layer.heads):
            yield layer, head, tails.head(head)


def entropy_collapse(history: WarningHistory, t: Thresholds) -> list[HealthWarning]:
    """A head's latest mean normalised entropy below ``t.entropy_collapse``."""
    return [_warning("entropy_collapse", layer.name, head,
                     f"{layer.name} head {head}: attention entropy {value:.3f} < "
                     f"{t.entropy_collapse:g}", history.recent(tail))
            for layer, head, tail in _per_head(history, "entropy")
            if (value := tail.latest) is not None and value < t.entropy_collapse]


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


def entropy_falling(history: WarningHistory, t: Thresholds) -> list[HealthWarning]:
    """A head's entropy falling fast against its own level: over the last ``t.trend_samples``
    samples, slope / m < -``t.entropy_fall_rate`` per step and the fitted fall > ``t.entropy_fall_min``
    x m, where m is the head's median entropy over the samples the rule sees (after the warm-up).
    Relative to the head's own history, so a head that is meant to be sharp is judged by its
    own scale."""
    warnings = []
    steps = list(history.steps)[-t.trend_samples:]
    span = steps[-1] - steps[0] if steps else 0
    for layer, head, tail in _per_head(history, "entropy"):
        rate = slope(steps, tail.last(t.trend_samples))
        level = layer.entropy_medians[head].median()
        if rate is None or level is None or not level > 0:
            continue
        relative = rate / level
        if relative < -t.entropy_fall_rate and -relative * span > t.entropy_fall_min:
            warnings.append(_warning(
                "entropy_falling", layer.name, head,
                f"{layer.name} head {head}: attention entropy falling {-relative:.2g} of its "
                f"median {level:.3f} per step (> {t.entropy_fall_rate:g})",
                {**history.recent(tail), "slope_per_step": rate, "median": level}))
    return warnings


def logit_growth(history: WarningHistory, t: Thresholds) -> list[HealthWarning]:
    """A head's latest largest attention logit above ``t.logit_bound``."""
    return [_warning("logit_growth", layer.name, head,
                     f"{layer.name} head {head}: largest attention logit {value:.1f} > "
                     f"{t.logit_bound:g}", history.recent(tail))
            for layer, head, tail in _per_head(history, "max_logit")
            if (value := tail.latest) is not None and value > t.logit_bound]


def rank_collapse(history: WarningHistory, t: Thresholds) -> list[HealthWarning]:
    """Tokens entering a layer nearly identical: res below or mean cosine above its threshold."""
    warnings = []
    for layer in history.layers:
        residual, cosine = layer.tails["input_residual"], layer.tails["input_cosine"]
        res, cos = residual.latest, cosine.latest
        if (res is not None and res < t.rank_residual) or \
                (cos is not None and cos > t.rank_cosine):
            evidence = history.recent(residual)
            evidence["cosine"] = cosine.last(t.evidence_samples)
            warnings.append(_warning(
                "rank_collapse", layer.name, None,
                f"{layer.name}: tokens entering it have res {_format(res, '.2g')} (< "
                f"{t.rank_residual:g} collapses) and mean cosine {_format(cos, '.4f')} (> "
                f"{t.rank_cosine:g} collapses)", evidence))
    return warnings


def _format(value: float | None, spec: str) -> str:
    return "unknown" if value is None else format(value, spec)


def attention_sink(history: WarningHistory, t: Thresholds) -> list[HealthWarning]:
    """Most heads sink: more than ``t.sink_share`` of heads put > ``t.sink_eps`` on the first key.

    Gu et al. (2025)'s Sink_1^eps (:func:`robust_attn.metrics.sink_rate`, eps = 0.3)
    over the heads of every layer that has no explicit sink key (for those,
    mass on the first key is the design).
    """
    rate = history.sink_rates.latest
    if rate is None or rate <= t.sink_share:
        return []
    sinking = [f"{layer.name}/{head}" for layer, head, tail in _per_head(history, "sink_mass")
               if not layer.explicit_sink and tail.latest is not None and tail.latest > t.sink_eps]
    return [_warning("attention_sink", None, None,
                     f"{rate:.0%} of heads put > {t.sink_eps:g} of their attention on the first "
                     f"key (> {t.sink_share:.0%})",
                     {**history.recent(history.sink_rates), "heads": sinking})]


def loss_spike(history: WarningHistory, t: Thresholds) -> list[HealthWarning]:
    """Losses above the robust band (:func:`~robust_attn.health.warning_history.robust_edge`) of
    the previous ``t.loss_window`` steps' finite losses, when at least ``t.loss_min_history``."""
    if not history.spikes:
        return []
    step, value, edge = history.recent_spikes[-1]
    return [_warning("loss_spike", None, None,
                     f"loss spiked at {history.spikes} step(s), latest step {step}: "
                     f"{value:.4g} > band {edge:.4g}",
                     {"steps": [s for s, _, _ in history.recent_spikes],
                      "values": [v for _, v, _ in history.recent_spikes],
                      "band": [e for _, _, e in history.recent_spikes]})]


def loss_oscillation(history: WarningHistory, t: Thresholds) -> list[HealthWarning]:
    """The last losses alternate up and down, with changes large against the loss itself."""
    recent = history.finite_losses
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


def divergence(history: WarningHistory, t: Thresholds) -> list[HealthWarning]:
    """A non-finite loss, or a layer whose latest probe counted non-finite q, k, v or output."""
    warnings = []
    if history.nonfinite_losses:
        first = history.first_nonfinite_losses
        warnings.append(_warning("divergence", None, None,
                                 f"non-finite loss at {history.nonfinite_losses} step(s), first at "
                                 f"step {first[0][0]}",
                                 {"steps": [step for step, _ in first],
                                  "values": [loss for _, loss in first]}))
    for layer in history.layers:
        tail = layer.tails["nonfinite"]
        if tail.latest is not None and tail.latest > 0:
            warnings.append(_warning("divergence", layer.name, None,
                                     f"{layer.name}: {tail.latest:g} non-finite values in q, k, v "
                                     "or the attention output", history.recent(tail)))
    return warnings


def vanishing_gradients(history: WarningHistory, t: Thresholds) -> list[HealthWarning]:
    """A layer's latest gradient norm below ``t.vanishing_ratio`` times the largest layer's, or 0.

    Relative, because the loss sets the gradients' scale: the layer learns
    that much slower than the fastest one (with SGD; Adam rescales, but
    cannot recover a direction lost in rounding).
    """
    norms = [(layer, tail.latest) for layer in history.layers
             if (tail := layer.tails["grad_norm"]).latest is not None]
    if not norms:
        return []
    largest = max(norm for _, norm in norms)
    return [_warning("vanishing_gradients", layer.name, None,
                     f"{layer.name}: gradient norm {norm:.2g} is < {t.vanishing_ratio:g} of the "
                     f"largest layer's ({largest:.2g})",
                     {**history.recent(layer.tails["grad_norm"]), "largest": largest})
            for layer, norm in norms if norm == 0 or norm < t.vanishing_ratio * largest]


def exploding_gradients(history: WarningHistory, t: Thresholds) -> list[HealthWarning]:
    """A layer's latest gradient norm non-finite or > ``t.exploding_factor`` x the median of its
    earlier finite ones (at least 3)."""
    warnings = []
    for layer in history.layers:
        latest, earlier = layer.grad_norm, layer.earlier_grad_norms
        if latest is None:
            continue
        median = earlier.median() if len(earlier) >= 3 else None
        if math.isinf(latest) or (math.isnan(latest) and len(earlier)) or \
                (median is not None and latest > t.exploding_factor * median):
            warnings.append(_warning(
                "exploding_gradients", layer.name, None,
                f"{layer.name}: gradient norm {latest:.3g}, earlier median "
                f"{median if median is not None else math.nan:.3g}",
                {**history.recent(layer.tails["grad_norm"]), "earlier_median": median}))
    return warnings


def redundant_layer(history: WarningHistory, t: Thresholds) -> list[HealthWarning]:
    """A layer whose centred attention maps repeat the previous layer's (similarity > threshold)."""
    return [_warning("redundant_layer", layer.name, None,
                     f"{layer.name}: attention maps repeat the previous layer's (similarity "
                     f"{value:.3f} > {t.redundant_similarity:g})", history.recent(tail))
            for layer in history.layers
            if (value := (tail := layer.tails["map_similarity"]).latest) is not None
            and value > t.redundant_similarity]


def lazy_layer(history: WarningHistory, t: Thresholds) -> list[HealthWarning]:
    """A layer whose attention output is below ``t.lazy_gain`` of its input's norm."""
    return [_warning("lazy_layer", layer.name, None,
                     f"{layer.name}: attention output is {value:.2g} of its input (< "
                     f"{t.lazy_gain:g}): the branch contributes almost nothing",
                     history.recent(tail))
            for layer in history.layers
            if (value := (tail := layer.tails["branch_gain"]).latest) is not None
            and value < t.lazy_gain]


RULES: dict[str, Callable[[WarningHistory, Thresholds], list[HealthWarning]]] = {
    "entropy_collapse": entropy_collapse, "entropy_falling": entropy_falling,
    "logit_growth": logit_growth, "rank_collapse": rank_collapse,
    "attention_sink": attention_sink, "loss_spike": loss_spike,
    "loss_oscillation": loss_oscillation, "divergence": divergence,
    "vanishing_gradients": vanishing_gradients, "exploding_gradients": exploding_gradients,
    "redundant_layer": redundant_layer, "lazy_layer": lazy_layer,
}


def _key(warning: HealthWarning) -> tuple:
    return warning.code, warning.layer, warning.head


class EarlyWarnings:
    """:func:`check` kept up to date as a report grows: :meth:`update` with the report (the same
    one, longer: a monitor's series are append-only), then :meth:`warnings`. Each new sample costs
    O(layers x heads) (and O(log n) for two running medians), whatever the samples before it:
    :class:`~robust_attn.health.warning_history.WarningHistory` keeps what the rules read.

    Hysteresis: the keys the rules fired right after each of the last ``persistence - 1`` samples
    (with the losses up to that sample's step) are kept; a warning counts when its key fired at
    each of them and now.
    """

    def __init__(self, thresholds: Thresholds | None = None, codes: Collection[str] | None = None):
        self.thresholds = t = thresholds or Thresholds()
        self.codes = list(RULES) if codes is None else [code for code in RULES if code in codes]
        self._all = WarningHistory(t)
        self._warmed = WarningHistory(t, t.warmup_steps) if t.warmup_steps else self._all
        self._histories = (self._all, self._warmed) if t.warmup_steps else (self._all,)
        self._samples = 0
        self._fired: dict[int, set[tuple]] = {}  # samples -> keys fired right after them

    def update(self, report: MonitorReport, samples: int | None = None) -> None:
        """Read ``report``'s samples after the ones read before: all of them and all its losses,
        or the first ``samples`` and the losses up to the last one's step (as
        :meth:`MonitorReport.truncated`)."""
        count = len(report.steps) if samples is None else samples
        if not self._samples <= count <= len(report.steps) or \
                self._all.losses > len(report.losses):
            raise ValueError(f"samples={samples!r}: the report has {len(report.steps)} samples and "
                             f"{len(report.losses)} losses, {self._samples} and "
                             f"{self._all.losses} already read: update with the same, longer report")
        persistence = self.thresholds.persistence
        for index in range(self._samples, count):
            self._push_losses(report, report.steps[index] + 1)
            for history in self._histories:
                history.push_sample(report, index)
            self._samples = index + 1
            if persistence > 1 and self._samples > count - persistence:
                self._fired[self._samples] = {_key(w) for w in self._fire()}
        self._push_losses(report, len(report.losses) if samples is None else
                          report.steps[count - 1] + 1 if count else 0)
        self._fired = {k: keys for k, keys in self._fired.items() if k > count - persistence}

    def warnings(self, in_use: Collection[str] = ()) -> list[HealthWarning]:
        """The warnings the report read so far raises now (as :func:`check`)."""
        current = self._fire()
        for back in range(1, self.thresholds.persistence):
            earlier = self._fired.get(self._samples - back, set())
            current = [w for w in current if w.code in IMMEDIATE or _key(w) in earlier]
        return [suggest(warning, in_use) for warning in current] if in_use else current

    def _push_losses(self, report: MonitorReport, stop: int) -> None:
        for index in range(self._all.losses, min(stop, len(report.losses))):
            for history in self._histories:
                history.push_loss(report.losses[index])

    def _fire(self) -> list[HealthWarning]:
        """The rules' raw warnings: after the warm-up, except for the immediate codes."""
        return [warning for code in self.codes for warning in
                RULES[code](self._all if code in IMMEDIATE else self._warmed, self.thresholds)]


def check(report: MonitorReport, thresholds: Thresholds | None = None,
          in_use: Collection[str] = (), codes: Collection[str] | None = None
          ) -> list[HealthWarning]:
    """The warnings ``report`` raises now, in the order of :data:`RULES`.

    A rule's warning counts when the rule fired for the same layer and head on
    each of the last ``thresholds.persistence`` sampled steps (hysteresis;
    immediate codes need once). in_use: presets the model already uses, left out
    of the suggestions. codes: only these rules (default all). Costs O(samples + losses); to
    check a growing report after each sample, keep an :class:`EarlyWarnings` instead.
    """
    warnings = EarlyWarnings(thresholds, codes)
    warnings.update(report)
    return warnings.warnings(in_use)


def replay(report: MonitorReport, thresholds: Thresholds | None = None,
           in_use: Collection[str] = (), codes: Collection[str] | None = None
           ) -> list[tuple[int, list[HealthWarning]]]:
    """(sampled step, the warnings :func:`check` raised right after it) for every sampled step:
    what a monitor checked after each sample would have said, for scoring lead time."""
    warnings, timeline = EarlyWarnings(thresholds, codes), []
    for samples in range(1, len(report.steps) + 1):
        warnings.update(report, samples)
        timeline.append((report.steps[samples - 1], warnings.warnings(in_use)))
    return timeline

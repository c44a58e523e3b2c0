"""When a training run failed, and from which step: decided from its losses alone.

The rule reads only the training loss of every step, the final eval loss
and the unigram entropy of the training text (the loss of a model that
ignores the context). It never reads the health
monitor, so the monitor's warnings can be scored against it.

    s_t = mean of the finite training losses of steps t - 9 .. t (the smoothed loss)

A run **failed** when one of these holds (checked in this order):

1. ``diverged``: a training loss is non-finite, or the model refused to run
   (overflowing logits). Failure step: the first such step.
2. ``blew_up``: s_t exceeds the lowest earlier smoothed loss by more than
   ``margin`` = 0.5 nats for ``patience`` = 10 consecutive steps (a loss spike
   that does not recover at once; Wortsman et al. 2023 call such runs
   unstable). Failure step: the first step of that excursion.
3. ``stalled``: the final eval loss is above the unigram entropy minus
   ``STALL_GAIN`` = 0.25 nats: after the whole run the model gained less than
   0.25 nats per character from the context over predicting character
   frequencies (healthy runs of recipes/warning_corpus.py gain 0.5-0.75;
   entropy collapse with a loss plateau ends here). Failure step: the first
   step where s_t is within 10 % of the run's total fall of its final value,
   i.e. where the plateau begins.

Otherwise the run is **healthy** (failure step None).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MARGIN = 0.5
PATIENCE = 10
WINDOW = 10
PLATEAU_SHARE = 0.1
STALL_GAIN = 0.25


@dataclass(frozen=True)
class Verdict:
    failed: bool
    kind: str  # "healthy", "diverged", "blew_up" or "stalled"
    failure_step: int | None


def smoothed(losses: list[float], window: int = WINDOW) -> list[float]:
    """s_t: mean of the finite losses among steps t - window + 1 .. t (nan if none)."""
    out = []
    for t in range(len(losses)):
        finite = [v for v in losses[max(0, t - window + 1):t + 1] if math.isfinite(v)]
        out.append(sum(finite) / len(finite) if finite else math.nan)
    return out


def judge(losses: list[float], eval_final: float, unigram_entropy: float) -> Verdict:
    """The verdict of the module's rule for one run (``losses``: one per step taken)."""
    if not losses:
        raise ValueError("losses: the run took no step")
    bad = next((t for t, v in enumerate(losses) if not math.isfinite(v)), None)
    if bad is not None or not math.isfinite(eval_final):
        return Verdict(True, "diverged", bad if bad is not None else len(losses) - 1)
    s = smoothed(losses)
    best, run_start, run_length = math.inf, None, 0
    for t, value in enumerate(s):
        if value > best + MARGIN:
            run_start = t if run_length == 0 else run_start
            run_length += 1
            if run_length >= PATIENCE:
                return Verdict(True, "blew_up", run_start)
        else:
            run_length = 0
        best = min(best, value)
    if eval_final > unigram_entropy - STALL_GAIN:
        final = s[-1]
        edge = final + PLATEAU_SHARE * max(s[0] - final, 0.0)
        return Verdict(True, "stalled", next(t for t, v in enumerate(s) if v <= edge))
    return Verdict(False, "healthy", None)

"""Scores of an early-warning code over labelled runs: recall, lead time, false alarms.

A run's *timeline* for a code is, per sampled step, the set of (layer, head)
keys the code was raised for after that step (robust_attn.health.early_warnings.replay).
Over a set of runs (labels from recipes/_failure.py):

    recall        share of failed runs whose first warning came at a sampled step
                  strictly before the failure step
    lead          failure step - first warning step, over the warned failed runs:
                  median in steps; median of lead / failure step, the share of the
                  run before the failure that the warning came ahead of it (the
                  issue's "lead time >= 20 % of the run before the failure"; 1 =
                  warned at step 0); and median of lead / run length (the steps
                  the run was configured for)
    alarms/1k     warning onsets per 1000 training steps on healthy runs (an onset:
                  a key raised at a sampled step that was not raised at the one before)
    healthy warned  share of healthy runs with any warning of the code

Targets (issue 13): recall >= 0.9, median lead / failure step >= 0.2, healthy warned <= 0.05.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass

TARGETS = {"recall": 0.9, "median_lead_before_failure": 0.2, "healthy_warned": 0.05}

Timeline = list[tuple[int, frozenset]]  # (sampled step, keys raised after it)


@dataclass(frozen=True)
class Run:
    """A labelled run and its timeline for one code."""

    name: str
    failed: bool
    failure_step: int | None
    steps: int  # the run's configured length
    steps_taken: int
    timeline: Timeline

    def first_warning(self) -> int | None:
        return next((step for step, keys in self.timeline if keys), None)

    def onsets(self) -> int:
        previous, count = frozenset(), 0
        for _, keys in self.timeline:
            count += len(keys - previous)
            previous = keys
        return count


@dataclass(frozen=True)
class Score:
    failed: int
    healthy: int
    recall: float
    median_lead_steps: float
    median_lead_before_failure: float
    median_lead_of_run: float
    alarms_per_1k_steps: float
    healthy_warned: float

    def meets_targets(self) -> bool:
        return (self.recall >= TARGETS["recall"]
                and self.median_lead_before_failure >= TARGETS["median_lead_before_failure"]
                and self.healthy_warned <= TARGETS["healthy_warned"])

    def to_dict(self) -> dict:
        return {**asdict(self), "meets_targets": self.meets_targets()}


def score(runs: Sequence[Run]) -> Score:
    failed = [run for run in runs if run.failed]
    healthy = [run for run in runs if not run.failed]
    leads = [(run.failure_step - first, (run.failure_step - first) / run.failure_step,
              (run.failure_step - first) / run.steps) for run in failed
             if (first := run.first_warning()) is not None and first < run.failure_step]
    healthy_steps = sum(run.steps_taken for run in healthy)
    return Score(
        failed=len(failed), healthy=len(healthy),
        recall=len(leads) / len(failed) if failed else math.nan,
        median_lead_steps=statistics.median(lead[0] for lead in leads) if leads else math.nan,
        median_lead_before_failure=statistics.median(lead[1] for lead in leads)
        if leads else math.nan,
        median_lead_of_run=statistics.median(lead[2] for lead in leads) if leads else math.nan,
        alarms_per_1k_steps=1000 * sum(run.onsets() for run in healthy) / healthy_steps
        if healthy_steps else math.nan,
        healthy_warned=sum(run.first_warning() is not None for run in healthy) / len(healthy)
        if healthy else math.nan)


def persist(raw: Timeline, persistence: int, immediate: bool = False) -> Timeline:
    """A timeline of raw rule firings under hysteresis: a key counts at sample k when it fired
    at each of samples k - persistence + 1 .. k (as robust_attn.health.early_warnings.check does)."""
    if immediate or persistence <= 1:
        return raw
    out = []
    for k, (step, keys) in enumerate(raw):
        kept = keys
        for back in range(1, persistence):
            kept = kept & raw[k - back][1] if k - back >= 0 else frozenset()
        out.append((step, kept))
    return out

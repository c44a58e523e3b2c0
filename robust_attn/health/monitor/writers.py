"""Writers: each sampled step's readings where trainers already look (TensorBoard, W&B, CSV).

A writer is any object with ``write(report, warnings)``; a
:class:`~robust_attn.HealthMonitor` built with ``writers=[...]`` calls it right
after every sampled step, with the report so far (its last sample is the new
one) and the warnings that report raises then (:func:`~robust_attn.health.early_warnings.check`).
The writers here take no dependency: each wraps an object the user already has.

Tags (stable; the same for every writer, from :func:`readings`):

- ``attention/<layer>/head_<h>/<metric>`` for each per-head metric
  (:data:`~robust_attn.health.monitor.HEAD_METRICS`) of head h;
- ``attention/<layer>/<metric>`` for each per-layer metric
  (:data:`~robust_attn.health.monitor.LAYER_METRICS`), and for each per-head
  metric its layer value: the lowest head for ``min_entropy``, the largest for
  ``max_logit``, else the mean over heads (nan heads, e.g. modules that did not
  run, left out; nan if all are);
- ``attention/warnings``: the warnings as text, one per line (only at steps with warnings).

``<layer>`` is the module's name in the model (``blocks.0.attn``). The loss is not
written: the training loop logs it already. Values are the report's own numbers,
nan included (a first layer has no previous map to compare with).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ..early_warnings import HealthWarning
from .report import HEAD_METRICS, LAYER_METRICS, MonitorReport

WARNINGS_TAG = "attention/warnings"
# How a per-head metric becomes its layer value (else the mean over heads).
_LAYER_REDUCTIONS = {"min_entropy": min, "max_logit": max}


class MonitorWriter(Protocol):
    """What a HealthMonitor writes each sampled step to."""

    def write(self, report: MonitorReport, warnings: list[HealthWarning]) -> None:
        """Write ``report``'s last sample (step ``report.steps[-1]``) and ``warnings``."""


def readings(report: MonitorReport, index: int = -1) -> dict[str, float]:
    """The tagged values of the sample at ``index`` of ``report`` (the tags in the module doc)."""
    values: dict[str, float] = {}
    for series in report.layers:
        prefix = f"attention/{series.name}"
        for metric in HEAD_METRICS:
            heads = getattr(series, metric)[index]
            for head, value in enumerate(heads):
                values[f"{prefix}/head_{head}/{metric}"] = value
            values[f"{prefix}/{metric}"] = _layer_value(metric, heads)
        for metric in LAYER_METRICS:
            values[f"{prefix}/{metric}"] = getattr(series, metric)[index]
    return values


def warnings_text(warnings: list[HealthWarning]) -> str:
    """The warnings as text, one per line (``str(warning)``: code, layer, head, advice)."""
    return "\n".join(str(warning) for warning in warnings)


class TensorBoardWriter:
    """Scalars and warning text to ``writer``: a ``torch.utils.tensorboard.SummaryWriter`` or any
    object with ``add_scalar(tag, value, global_step)`` and ``add_text(tag, text, global_step)``.
    The caller owns ``writer`` (and closes it)."""

    def __init__(self, writer):
        _require_methods("writer", writer, ("add_scalar", "add_text"))
        self.writer = writer

    def write(self, report: MonitorReport, warnings: list[HealthWarning]) -> None:
        step = report.steps[-1]
        for tag, value in readings(report).items():
            self.writer.add_scalar(tag, value, step)
        if warnings:
            self.writer.add_text(WARNINGS_TAG, warnings_text(warnings), step)


class MetricsWriter:
    """One ``log(values, step=step)`` call per sampled step: Weights & Biases (``wandb.log`` or a
    run's ``run.log``, whose signature is ``log(data: dict, step: int | None = None, ...)``) or a
    Lightning logger's ``log_metrics(metrics, step)``.

    warnings_key: the key the warnings' text goes under (W&B takes text values); None to leave
    text out, for loggers that take numbers only (Lightning's).
    """

    def __init__(self, log: Callable, warnings_key: str | None = WARNINGS_TAG):
        if not callable(log):
            raise TypeError(f"log={log!r}: expected a callable log(values, step=step), "
                            "e.g. wandb.log")
        self.log = log
        self.warnings_key = warnings_key

    def write(self, report: MonitorReport, warnings: list[HealthWarning]) -> None:
        values: dict[str, float | str] = dict(readings(report))
        if warnings and self.warnings_key is not None:
            values[self.warnings_key] = warnings_text(warnings)
        self.log(values, step=report.steps[-1])


class CSVWriter:
    """Appends each sample's rows to ``path`` in :meth:`MonitorReport.to_csv`'s format (the same
    columns, readable with :meth:`MonitorReport.from_csv` and ``robust-attn doctor --run``), so the
    file is current during the run and each write costs one sample, however long the run.

    An existing file at ``path`` is replaced when the writer is made. Warnings are not in the
    CSV: :meth:`HealthMonitor.warnings` or ``doctor`` replays them from it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.unlink(missing_ok=True)
        self._scratch = self.path.with_name(self.path.name + ".sample")

    def write(self, report: MonitorReport, warnings: list[HealthWarning]) -> None:
        """to_csv of the last sample alone (the one writer of the format), then append its rows."""
        report.since(report.steps[-1]).to_csv(self._scratch)
        header, *rows = self._scratch.read_text().splitlines(keepends=True)
        self._scratch.unlink()
        with self.path.open("a", newline="") as handle:
            if handle.tell() == 0:
                handle.write(header)
            handle.writelines(rows)


def _layer_value(metric: str, heads: list[float]) -> float:
    present = [value for value in heads if not math.isnan(value)]
    if not present:
        return math.nan
    return _LAYER_REDUCTIONS.get(metric, statistics.fmean)(present)


def _require_methods(argument: str, value, methods: tuple[str, ...]) -> None:
    missing = [name for name in methods if not callable(getattr(value, name, None))]
    if missing:
        raise TypeError(f"{argument}={value!r} has no {', '.join(missing)} method")

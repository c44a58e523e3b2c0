"""HealthMonitor: the probe on a sample of training steps, gathered per layer and head over time.

    monitor = HealthMonitor(model, every=10)
    for batch in loader:
        loss = criterion(model(batch.x), batch.y)
        loss.backward()
        monitor.step(loss)            # after backward, before zero_grad: reads gradient norms
        optimizer.step(); optimizer.zero_grad()
    monitor.warnings(); monitor.report().to_dict(); monitor.to_csv("health.csv")
    monitor.close()                   # or: with HealthMonitor(model) as monitor: ...

Steps are counted by ``step()`` calls from 0; step t is sampled when
t % every == 0. Only for the forward passes of a sampled step are the
monitor's observers attached (:meth:`RobustAttention.register_observer`): they
receive each call's health; on every other step the modules run their plain
forward and ``step`` only keeps the loss (detached, without a device sync). If
a sampled step runs several forwards, the last one counts. The monitor never
touches the modules' ``probe`` switches or ``health`` attributes, so several
monitors (in several threads too) can watch one model.

With ``reduce_across_ranks=True`` and an initialised torch.distributed
default group, each sampled step's readings (and the losses since the
previous sample) are reduced over the ranks of ``process_group`` (None: the
default group) with :func:`robust_attn.health.distributed.all_reduce`: means over the
ranks, except the largest logit (max), the lowest entropy (min) and the
non-finite counts (sum). Every rank must then call ``step`` equally often.

``writers`` (:mod:`robust_attn.health.monitor.writers`: TensorBoard, Weights &
Biases, CSV, or any object with ``write(report, warnings)``) are called right
after each sampled step with the report so far and the warnings it raises then.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..distributed import all_reduce, pack, unpack
from ..early_warnings import EarlyWarnings, HealthWarning, Thresholds
from ..probe import AttentionHealth
from .in_use import presets_in_use
from .maps import attention_modules
from .report import HEAD_METRICS, LAYER_METRICS, LayerSeries, MonitorReport
from .sampled_step import SampledStep
from .writers import MonitorWriter

_READING_KINDS = {"max_logit": "max", "min_entropy": "min", "nonfinite": "sum"}  # else "mean"


class HealthMonitor:
    """Samples the health of every RobustAttention in ``model`` every ``every`` steps.

    Args:
        model: any module containing RobustAttention modules (timm models
            converted with :func:`robust_attn.convert` included).
        every: sampling period in steps (default 10).
        reduce_across_ranks: all-reduce the readings over torch.distributed ranks.
        process_group: the ranks to reduce over (None: the default group).
        thresholds: the early-warning thresholds (:class:`robust_attn.health.early_warnings.Thresholds`).
        keep_maps: keep the attention maps of the latest sampled step for
            :meth:`attention_maps` (memory: one sampled map per module).
        writers: objects with ``write(report, warnings)``, called after each sampled step
            (:mod:`robust_attn.health.monitor.writers`); with writers, each sampled step also
            runs :meth:`warnings`, which reads only the samples since the last call
            (:class:`~robust_attn.health.early_warnings.EarlyWarnings`): its cost does not grow
            with the run (benchmarks/results/monitor-overhead.md).
    """

    def __init__(self, model: nn.Module, every: int = 10, reduce_across_ranks: bool = False,
                 thresholds: Thresholds | None = None, keep_maps: bool = False,
                 process_group=None, writers: Iterable[MonitorWriter] = ()):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every={every!r}: expected a positive integer")
        self.modules = attention_modules(model)
        if not self.modules:
            raise ValueError(f"{type(model).__name__} has no RobustAttention module to monitor; "
                             "convert timm models first with robust_attn.convert(model, variant)")
        self.every = every
        self.writers = _checked_writers(writers)
        self.reduce_across_ranks = reduce_across_ranks
        self.process_group = process_group
        self.thresholds = thresholds or Thresholds()
        self._early_warnings = EarlyWarnings(self.thresholds)
        self.keep_maps = keep_maps
        self.in_use = presets_in_use(self.modules.values())
        self._maps: dict[str, Tensor] = {}
        self._latest_health: dict[str, AttentionHealth] = {}
        self._device = next(iter(self.modules.values())).qkv.weight.device
        self._report = MonitorReport(every, layers=[
            LayerSeries(name, module.num_heads, explicit_sink=_has_explicit_sink(module))
            for name, module in self.modules.items()])
        self._pending_losses: list[Tensor | None] = []
        self._steps_taken = 0
        self._sampled: SampledStep | None = None
        self._closed = False
        self._sample_if_due()

    def __enter__(self) -> HealthMonitor:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def step(self, loss: Tensor | float | None = None) -> None:
        """End a training step: keep its loss; on a sampled step, read the probes and gradients."""
        if self._closed:
            raise RuntimeError("this HealthMonitor is closed")
        self._pending_losses.append(_loss_tensor(loss))
        if self._sampled is not None:
            readings = self._sampled.collect()
            self._latest_health = dict(self._sampled.health)
            if self.keep_maps:
                self._maps = self._sampled.maps
            self._sampled.close()
            self._sampled = None
            for name, module in self.modules.items():
                readings[name]["grad_norm"] = _grad_norm(module)
            self._record(readings)
            self._write()
        self._steps_taken += 1
        self._sample_if_due()

    def report(self) -> MonitorReport:
        """The series so far (a snapshot: later steps do not change it). Its series share the
        monitor's append-only lists (:class:`~robust_attn.health.monitor.report.SeriesSnapshot`), so
        the cost does not grow with the run."""
        self._flush_losses()
        return self._report.snapshot()

    def latest_health(self) -> dict[str, AttentionHealth]:
        """Each module's :class:`~robust_attn.AttentionHealth` at the latest sampled step (the last
        forward of that step), by name; empty before the first sampled step ends."""
        return dict(self._latest_health)

    def attention_maps(self) -> dict[str, Tensor]:
        """Each module's attention map (H, Nq', Nk) of the first batch item at the latest sampled
        step, as :func:`robust_attn.health.monitor.attention_maps` gives them (needs ``keep_maps``)."""
        if not self.keep_maps:
            raise RuntimeError("construct the HealthMonitor with keep_maps=True to keep maps")
        return dict(self._maps)

    def warnings(self) -> list[HealthWarning]:
        """The early warnings the series so far raise (:mod:`robust_attn.health.early_warnings`); their
        suggestions leave out the presets the model already uses (:attr:`in_use`)."""
        self._early_warnings.update(self.report())
        return self._early_warnings.warnings(self.in_use)

    def to_csv(self, path):
        """Write :meth:`MonitorReport.to_csv` of the series so far; returns the path."""
        return self.report().to_csv(path)

    def close(self) -> None:
        """Detach: remove the observers."""
        if self._closed:
            return
        if self._sampled is not None:
            self._sampled.close()
            self._sampled = None
        self._closed = True

    def _sample_if_due(self) -> None:
        if self._steps_taken % self.every == 0:
            self._sampled = SampledStep(self.modules, self.keep_maps)

    def _record(self, readings: dict[str, dict[str, Tensor]]) -> None:
        """Reduce over ranks if asked, bring everything to the host in one transfer, append."""
        keyed = {(name, metric): value for name, layer in readings.items()
                 for metric, value in layer.items()}
        keyed["losses"] = pack([loss for loss in self._pending_losses if loss is not None],
                               self._device)
        if self.reduce_across_ranks:
            keyed = all_reduce(keyed, _reduction_kind, self._device, self.process_group)
        keys = list(keyed)
        values = unpack(pack([keyed[key] for key in keys], self._device).cpu(),
                        [keyed[key] for key in keys])
        host = dict(zip(keys, (value.tolist() for value in values), strict=True))
        self._append_losses(host.pop("losses"))
        self._report.steps.append(self._steps_taken)
        for series in self._report.layers:
            for metric in HEAD_METRICS + LAYER_METRICS:
                getattr(series, metric).append(host[(series.name, metric)])

    def _write(self) -> None:
        """Hand the writers the report with the new sample and the warnings it raises."""
        if self.writers:
            report = self.report()
            self._early_warnings.update(report)
            warnings = self._early_warnings.warnings(self.in_use)
            for writer in self.writers:
                writer.write(report, warnings)

    def _flush_losses(self) -> None:
        """Losses of steps after the last sample, this rank's own (reduced at the next sample)."""
        given = [loss for loss in self._pending_losses if loss is not None]
        self._append_losses(pack(given, self._device).tolist())

    def _append_losses(self, given: list[float]) -> None:
        """Append the pending steps' losses: the given values in order, None where none was fed."""
        values = iter(given)
        self._report.losses.extend(None if loss is None else next(values)
                                   for loss in self._pending_losses)
        self._pending_losses = []


def _checked_writers(writers) -> tuple[MonitorWriter, ...]:
    if isinstance(writers, (str, bytes)) or not isinstance(writers, Iterable):
        raise TypeError(f"writers={writers!r}: expected a list of writers")
    writers = tuple(writers)
    for writer in writers:
        if not callable(getattr(writer, "write", None)):
            raise TypeError(f"writers: {writer!r} has no write(report, warnings) method "
                            "(wrap a SummaryWriter in TensorBoardWriter, wandb.log in MetricsWriter)")
    return writers


def _reduction_kind(key) -> str:
    metric = key if isinstance(key, str) else key[1]
    return _READING_KINDS.get(metric, "mean")


def _loss_tensor(loss: Tensor | float | None) -> Tensor | None:
    if loss is None:
        return None
    if isinstance(loss, Tensor):
        if loss.numel() != 1:
            raise ValueError(f"loss must be a scalar, got a tensor of shape {tuple(loss.shape)}")
        return loss.detach().reshape(())
    return torch.tensor(float(loss))


def _grad_norm(module: nn.Module) -> Tensor:
    """L2 norm of all parameter gradients of the attention layer ``module`` watches (itself, or
    for a Hugging Face attention's container its ``host``, projections included); nan when none
    has a gradient."""
    layer = getattr(module, "host", module)
    grads = [p.grad.detach().float() for p in layer.parameters() if p.grad is not None]
    if not grads:
        return torch.tensor(math.nan)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def _has_explicit_sink(module: nn.Module) -> bool:
    """Whether the module prepends sink keys, so mass on its first key is by design."""
    return any(m.prepended_keys() > 0 for m in module.mitigations.values())


"""A PyTorch Lightning callback that runs a HealthMonitor over ``trainer.fit``.

    from robust_attn.health.monitor.lightning import HealthMonitorCallback
    callback = HealthMonitorCallback(every=10)
    trainer = lightning.Trainer(callbacks=[callback]); trainer.fit(module)
    callback.monitor.warnings()

``on_fit_start`` attaches a :class:`~robust_attn.HealthMonitor` to the LightningModule
and adds a :class:`~robust_attn.health.monitor.writers.MetricsWriter` for each of the
trainer's loggers (``logger.log_metrics(metrics, step)``: numbers only, so the warnings'
text goes to the writers you pass); ``on_train_batch_end`` ends the monitor's step
with the batch's loss. In Lightning's automatic optimisation the gradients are zeroed
just before the next backward, so they are still there to read at that hook. Steps
are counted by training batches from 0 (the trainer's global step counts optimizer
steps: they differ with gradient accumulation or a resumed run). ``on_fit_end``
closes the monitor; ``callback.monitor`` keeps its report and warnings.

Lightning is not a dependency (``pip install robust-attn[lightning]``): the class
derives from ``lightning.pytorch.Callback`` (or ``pytorch_lightning.Callback``) when
one is installed, else from ``object``.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping

from torch import Tensor

from .health_monitor import HealthMonitor
from .writers import MetricsWriter, MonitorWriter


def _callback_base() -> type:
    for module in ("lightning.pytorch", "pytorch_lightning"):
        try:
            return importlib.import_module(module).Callback
        except ImportError:
            continue
    return object


class HealthMonitorCallback(_callback_base()):
    """Monitors the LightningModule being fit.

    Args:
        every: the monitor's sampling period in training batches.
        writers: more writers (e.g. a TensorBoardWriter for the warnings' text).
        log_to_loggers: also write the readings to each of ``trainer.loggers``.
        **monitor_options: the other :class:`~robust_attn.HealthMonitor` arguments
            (thresholds, keep_maps, reduce_across_ranks, process_group).
    """

    def __init__(self, every: int = 10, writers: Iterable[MonitorWriter] = (),
                 log_to_loggers: bool = True, **monitor_options):
        super().__init__()
        self.every = every
        self.writers = list(writers)
        self.log_to_loggers = log_to_loggers
        self.monitor_options = monitor_options
        self.monitor: HealthMonitor | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        loggers = [MetricsWriter(logger.log_metrics, warnings_key=None)
                   for logger in trainer.loggers] if self.log_to_loggers else []
        self.monitor = HealthMonitor(pl_module, every=self.every,
                                     writers=[*self.writers, *loggers], **self.monitor_options)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.monitor.step(_loss(outputs))

    def on_fit_end(self, trainer, pl_module) -> None:
        self.monitor.close()


def _loss(outputs) -> Tensor | None:
    """training_step's loss: the tensor it returned, or its ``"loss"`` entry (None if neither)."""
    if isinstance(outputs, Mapping):
        return outputs.get("loss")
    return outputs if isinstance(outputs, Tensor) else None

"""A transformers ``TrainerCallback`` that runs a HealthMonitor over ``Trainer.train``.

    from robust_attn.health.monitor.hf_trainer import HealthMonitorTrainerCallback
    callback = HealthMonitorTrainerCallback(every=10)
    trainer = Trainer(model, args, train_dataset=data)
    trainer.callback_handler.callbacks.insert(0, callback)   # before the report_to loggers
    trainer.train(); callback.monitor.warnings()

``on_train_begin`` attaches a :class:`~robust_attn.HealthMonitor` to the model;
``on_optimizer_step`` ends the monitor's step. That hook, not ``on_step_end``, because
the Trainer zeroes the gradients between the two and the monitor reads gradient norms.
The Trainer hands callbacks no per-step loss, so the monitor gets none and the loss
rules (loss_spike, loss_oscillation, a non-finite loss) stay silent; every other rule
works. Steps are counted by optimizer steps from 0 (``state.global_step - 1`` on a
fresh run). ``on_log`` adds the readings of the latest sample (the tags of
:func:`~robust_attn.health.monitor.writers.readings`) to the Trainer's logs, once per
sample; the Trainer calls its ``report_to`` loggers (TensorBoard, W&B, ...) in callback
order and appends user callbacks after them, hence the insert above: with
``add_callback`` only callbacks after this one see the readings. ``writers`` are the
monitor's own (e.g. a TensorBoardWriter for the warnings' text). ``on_train_end``
closes the monitor; ``callback.monitor`` keeps its report and warnings.

transformers is not a dependency: the class derives from ``transformers.TrainerCallback``
when it is installed, else from ``object``.
"""

from __future__ import annotations

from collections.abc import Iterable

from .health_monitor import HealthMonitor
from .writers import MonitorWriter, readings


def _callback_base() -> type:
    try:
        from transformers import TrainerCallback
    except ImportError:
        return object
    return TrainerCallback


class HealthMonitorTrainerCallback(_callback_base()):
    """Monitors the model a transformers Trainer trains.

    Args:
        every: the monitor's sampling period in optimizer steps.
        writers: the monitor's writers (:mod:`robust_attn.health.monitor.writers`).
        **monitor_options: the other :class:`~robust_attn.HealthMonitor` arguments.
    """

    def __init__(self, every: int = 10, writers: Iterable[MonitorWriter] = (), **monitor_options):
        self.every = every
        self.writers = list(writers)
        self.monitor_options = monitor_options
        self.monitor: HealthMonitor | None = None
        self._samples_logged = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None:
            raise ValueError("model=None: on_train_begin needs the Trainer's model")
        self.monitor = HealthMonitor(model, every=self.every, writers=self.writers,
                                     **self.monitor_options)
        self._samples_logged = 0

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.monitor.step()

    def on_log(self, args, state, control, logs=None, **kwargs):
        report = self.monitor.report()
        if logs is not None and len(report.steps) > self._samples_logged:
            logs.update(readings(report))
            self._samples_logged = len(report.steps)

    def on_train_end(self, args, state, control, **kwargs):
        self.monitor.close()

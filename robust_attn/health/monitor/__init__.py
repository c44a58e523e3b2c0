"""Training-time health: HealthMonitor samples the probe, gathers series, raises early warnings.

    with robust_attn.HealthMonitor(model, every=10) as monitor:
        for batch in loader:
            loss = train_step(model, batch)     # forward + backward
            monitor.step(loss)
    monitor.warnings(); monitor.report().to_dict(); monitor.to_csv("health.csv")

Each sampled step can also go to TensorBoard, Weights & Biases or a CSV file as it
happens (:mod:`.writers`: ``HealthMonitor(model, writers=[TensorBoardWriter(summary_writer)])``);
the Lightning and transformers callbacks (:mod:`.lightning`, :mod:`.hf_trainer`, imported
on demand) attach a monitor to a trainer.

:func:`attention_maps` runs a model once and returns each attention module's
map as the probe saw it (for pictures, :mod:`robust_attn.studies.plotting`).
"""

from .health_monitor import HealthMonitor
from .in_use import presets_in_use
from .maps import AttentionMap, attention_maps, attention_modules, map_similarity
from .report import HEAD_METRICS, LAYER_METRICS, LayerSeries, MonitorReport
from .writers import CSVWriter, MetricsWriter, MonitorWriter, TensorBoardWriter, readings

__all__ = ["HEAD_METRICS", "LAYER_METRICS", "AttentionMap", "CSVWriter", "HealthMonitor",
           "LayerSeries", "MetricsWriter", "MonitorReport", "MonitorWriter", "TensorBoardWriter",
           "attention_maps", "attention_modules", "map_similarity", "presets_in_use", "readings"]

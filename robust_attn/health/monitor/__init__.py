"""Training-time health: HealthMonitor samples the probe, gathers series, raises early warnings.

    with robust_attn.HealthMonitor(model, every=10) as monitor:
        for batch in loader:
            loss = train_step(model, batch)     # forward + backward
            monitor.step(loss)
    monitor.warnings(); monitor.report().to_dict(); monitor.to_csv("health.csv")

:func:`attention_maps` runs a model once and returns each attention module's
map as the probe saw it (for pictures, :mod:`robust_attn.studies.plotting`).
"""

from .health_monitor import HealthMonitor
from .in_use import presets_in_use
from .maps import AttentionMap, attention_maps, attention_modules, map_similarity
from .report import HEAD_METRICS, LAYER_METRICS, LayerSeries, MonitorReport

__all__ = ["HEAD_METRICS", "LAYER_METRICS", "AttentionMap", "HealthMonitor", "LayerSeries",
           "MonitorReport", "attention_maps", "attention_modules", "map_similarity",
           "presets_in_use"]

"""robust-attn: drop-in attention modules that avoid rank collapse and entropy collapse."""

from . import metrics, sparse
from .attention import RobustAttention, load_upgrading
from .health.distributed import reduce_health
from .health.early_warnings import HealthWarning, Thresholds
from .health.guard import NonFiniteError, nonfinite_guard
from .health.monitor import (
    CSVWriter,
    HealthMonitor,
    MetricsWriter,
    MonitorReport,
    TensorBoardWriter,
    attention_maps,
)
from .health.probe import AttentionHealth, health_probe, set_probe_enabled
from .health.records import recording
from .integrations import convert, layer, revert
from .logit_limit import overflow_refusal
from .mitigations import DefeatedMitigationWarning
from .optimizer_steps import after_optimizer_step, attach_to_optimizer
from .presets import create, list_variants, preset_options

__version__ = "0.1.0"

__all__ = [
    "AttentionHealth",
    "CSVWriter",
    "DefeatedMitigationWarning",
    "HealthMonitor",
    "HealthWarning",
    "MetricsWriter",
    "MonitorReport",
    "NonFiniteError",
    "RobustAttention",
    "TensorBoardWriter",
    "Thresholds",
    "after_optimizer_step",
    "attach_to_optimizer",
    "attention_maps",
    "convert",
    "create",
    "health_probe",
    "layer",
    "list_variants",
    "load_upgrading",
    "metrics",
    "nonfinite_guard",
    "overflow_refusal",
    "preset_options",
    "recording",
    "reduce_health",
    "revert",
    "set_probe_enabled",
    "sparse",
]

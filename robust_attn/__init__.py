"""robust-attn: drop-in attention modules that avoid rank collapse and entropy collapse."""

from . import metrics
from .attention import RobustAttention
from .presets import create, list_variants, preset_options
from .probe import AttentionHealth, health_probe, set_probe_enabled

__version__ = "0.1.0"

__all__ = [
    "AttentionHealth",
    "RobustAttention",
    "create",
    "health_probe",
    "list_variants",
    "metrics",
    "preset_options",
    "set_probe_enabled",
]

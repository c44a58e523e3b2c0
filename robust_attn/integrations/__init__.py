"""Integrations with other libraries: timm (convert, revert, and ``attn_layer=`` classes)."""

from .timm import (
    ConversionSummary,
    PresetAttention,
    RevertSummary,
    RobustAttentionRope,
    convert,
    layer,
    revert,
)

__all__ = ["ConversionSummary", "PresetAttention", "RevertSummary", "RobustAttentionRope",
           "convert", "layer", "revert"]

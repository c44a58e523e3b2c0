"""Integrations with other libraries: timm (convert, revert, and ``attn_layer=`` classes)."""

from .attn_layer import PresetAttention, layer
from .rope_attention import RobustAttentionRope
from .timm import ConversionSummary, RevertSummary, convert, revert

__all__ = ["ConversionSummary", "PresetAttention", "RevertSummary", "RobustAttentionRope",
           "convert", "layer", "revert"]

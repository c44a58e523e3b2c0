"""timm: convert and revert timm models, and ``attn_layer=`` classes for timm's constructors."""

from .attn_layer import PresetAttention, layer
from .convert import ConversionSummary, RevertSummary, convert, revert
from .rope_attention import RobustAttentionRope

__all__ = ["ConversionSummary", "PresetAttention", "RevertSummary", "RobustAttentionRope",
           "convert", "layer", "revert"]

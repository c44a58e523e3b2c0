"""Integrations with other libraries: timm (convert, revert, and ``attn_layer=`` classes) and
PyTorch's own ``nn.MultiheadAttention`` (:mod:`.torch_mha`, reached through convert and revert)."""

from .timm import (
    ConversionSummary,
    PresetAttention,
    RevertSummary,
    RobustAttentionRope,
    convert,
    layer,
    revert,
)
from .torch_mha import MultiheadRobustAttention

__all__ = ["ConversionSummary", "MultiheadRobustAttention", "PresetAttention", "RevertSummary",
           "RobustAttentionRope", "convert", "layer", "revert"]

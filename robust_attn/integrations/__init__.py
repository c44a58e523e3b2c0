"""Integrations with other libraries: timm (convert, revert, and ``attn_layer=`` classes), and
Hugging Face transformers (:mod:`.hf`, imported on demand: convert and revert delegate to it for
a ``PreTrainedModel``; ``import robust_attn`` does not import transformers)."""

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

"""Integrations with other libraries: timm (convert, revert, and ``attn_layer=`` classes),
PyTorch's own ``nn.MultiheadAttention`` (:mod:`.torch_mha`, reached through convert and revert),
and Hugging Face transformers (:mod:`.hf`, imported on demand: convert and revert delegate to it
for a ``PreTrainedModel``; ``import robust_attn`` does not import transformers)."""

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

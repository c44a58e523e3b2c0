"""QK-norm: normalise queries and keys per head before their dot product.

    q_h <- Norm(q_h),  k_h <- Norm(k_h)     (LayerNorm over the head dimension by default)

Bounds the attention logits by the norms' gains instead of the weights'
scale, which prevents the logit growth that drives entropy collapse
(Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion Parameters";
Henry et al. 2020, "Query-Key Normalization for Transformers"; Wortsman et al.
2023 show it removes attention-logit-growth instability).

timm's Attention has this option (``qk_norm=True`` with ``norm_layer``) and
names the layers ``q_norm`` and ``k_norm``; RobustAttention keeps exactly
those attributes so that timm state dicts load strictly. This mitigation builds
them (the layer stage, roles "q_norm" and "k_norm"); RobustAttention applies
them right after splitting the heads, where timm does. It is enabled by timm's
own constructor argument ``qk_norm=True``.
"""

from __future__ import annotations

from torch import nn

from ..config import AttentionConfig
from .base import LayerSpec, Mitigation


class QKNorm(Mitigation):
    """Option ``qk_norm``: ``config.norm_layer(head_dim)`` as q_norm and k_norm (no own state:
    the layers belong to RobustAttention, under timm's names)."""

    option = "qk_norm"
    presets = {"qk_norm": {"qk_norm": True}}

    def __init__(self, config: AttentionConfig):
        super().__init__()

    def make_layer(self, spec: LayerSpec, config: AttentionConfig) -> nn.Module | None:
        if spec.role not in ("q_norm", "k_norm"):
            return None
        return config.norm_layer(spec.in_features, **config.factory_kwargs)

    def keeps_function(self, source: nn.Module) -> bool:
        return not isinstance(getattr(source, "q_norm", nn.Identity()), nn.Identity)

    def timm_expressible(self, host: nn.Module) -> bool:
        return True  # timm's qk_norm=True

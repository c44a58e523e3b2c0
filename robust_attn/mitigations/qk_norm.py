"""QK-norm: normalise queries and keys per head before their dot product.

    q_h <- Norm(q_h),  k_h <- Norm(k_h)     (LayerNorm over the head dimension by default)

Bounds the attention logits by the norms' gains instead of the weights'
scale, which prevents the logit growth that drives entropy collapse
(Dehghani et al. 2023, "Scaling Vision Transformers to 22 Billion Parameters";
Henry et al. 2020, "Query-Key Normalization for Transformers"; Wortsman et al.
2023 show it removes attention-logit-growth instability).

timm's Attention has this option (``qk_norm=True`` with ``norm_layer``) and
names the layers ``q_norm`` and ``k_norm``; RobustAttention keeps exactly
those attributes so that timm state dicts load strictly. This file builds them.
"""

from __future__ import annotations

from torch import nn

from ..config import AttentionConfig


def qk_norm_layers(enabled: bool, config: AttentionConfig) -> tuple[nn.Module, nn.Module]:
    """(q_norm, k_norm): ``config.norm_layer(head_dim)`` each when enabled, else identities."""
    if not enabled:
        return nn.Identity(), nn.Identity()
    return tuple(config.norm_layer(config.head_dim, **config.factory_kwargs) for _ in range(2))

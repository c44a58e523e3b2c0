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

from ..claim import NO_ENTROPY_COLLAPSE, RANK, Claim, witnesses_at
from ..config import AttentionConfig
from .base import LayerSpec, Mitigation


class QKNorm(Mitigation):
    """Option ``qk_norm``: ``config.norm_layer(head_dim)`` as q_norm and k_norm (no own state:
    the layers belong to RobustAttention, under timm's names)."""

    option = "qk_norm"
    # Early warnings: code -> (rank among the presets suggested for it, 1 first; why it helps).
    advice_preset = 'qk_norm'
    advice = {
        'entropy_collapse': (2, 'qk_norm bounds them outright'),
        'entropy_falling': (2, 'qk_norm bounds them outright'),
        'logit_growth': (1, 'qk-layernorm stops attention logit growth (Wortsman et al. 2023)'),
        'loss_spike': (1, 'spikes follow logit growth (Wortsman et al. 2023)'),
        'loss_oscillation': (1, 'bounded logits tolerate larger steps'),
        'divergence': (1, 'bounded logits keep the softmax finite'),
        'exploding_gradients': (2, "bounded logits bound the softmax's gain"),
    }
    claims = (
        Claim(
            "qk_norm", "Henry et al. 2020; Dehghani et al. 2023; Wortsman et al. 2023",
            "normalising q and k bounds the attention logits, preventing the logit growth that "
            "collapses attention entropy",
            (NO_ENTROPY_COLLAPSE,),
            note="Measured: worst-layer H 0.887 (median at every point of the table), whatever "
                 "sqk: the normalised q and k no longer see the weights' scale. Not against rank "
                 "collapse.",
            witnesses=witnesses_at("qk_norm", RANK),
        ),
    )
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
        # timm's qk_norm=True; DiffAttention's normalises half-heads, not whole heads
        return getattr(getattr(host, "timm_origin", None), "kind", None) != "DiffAttention"

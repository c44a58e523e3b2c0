"""Gated attention: a sigmoid gate on each head's attention output, computed from the module input.

    Y' = Y * sigmoid(x W_g + b_g)      Y: attention output (B, H, N, D); x: module input (B, N, C)

Qiu et al. (2025), "Gated Attention for Large Language Models: Non-linearity,
Sparsity, and Attention-Sink-Free" (NeurIPS 2025), position G1: after scaled
dot-product attention, before the output projection (and before timm's
``scale_norm``). The gate is query-dependent (row i of x gates row i of Y), adds
a non-linearity between the value and output projections, and its sparsity lets
a head output nothing for a query, which removes the first-token attention sink
and the massive activations that come with it.

``gated=`` one of:

    "elementwise"  one gate per head and channel, W_g: (C, H * D). The paper's
                   best variant, used in Qwen3-Next. ``True`` means this too.
    "headwise"     one gate per head and token, W_g: (C, H); nearly as good in the
                   paper, with C * H weights instead of C * H * D.

The gate is an ``nn.Linear`` named ``gate`` with a bias when ``qkv_bias`` is set
and PyTorch's default init, so sigmoid(x W_g) starts near 0.5. The authors' code
(github.com/qiuzh20/gated_attention, ``modeling_qwen3.py``) packs W_g into
``q_proj`` (same bias flag and init as the query projection).

timm: ``timm.layers.Attention(gated=True)`` is ``gated="elementwise"``: the same
``Linear(dim, attn_dim, bias=qkv_bias)`` named ``gate``, stored here as
``mitigations.gated.gate``; timm applies it after ``scale_norm`` where this module
applies it before (the same when ``scale_norm=False``, the default).

Health: ``mean``, the mean gate value per head for the call measured (recomputed from
the call's input when the probe measures: nothing is kept from the forward).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from einops import rearrange
from torch import Tensor, nn

from ..claim import ENTROPY, RANK, Claim, witnesses_at
from ..config import AttentionConfig
from .base import HostLayers, Mitigation

if TYPE_CHECKING:
    from ..call import Attended, AttentionCall

GATE_MODES = ("elementwise", "headwise")


class Gated(Mitigation):
    option = "gated"
    # Early warnings: code -> (rank among the presets suggested for it, 1 first; why it helps).
    advice_preset = 'gated'
    advice = {
        'attention_sink': (1, 'an output gate removes the need for a sink (Qiu et al. 2025)'),
        'redundant_layer': (1, 'gates let heads specialise and switch off per token (Qiu et al. 2025)'),
        'lazy_layer': (1, 'a branch that adds nothing can be gated off (He et al. 2024)'),
    }
    claims = (
        Claim(
            "gated", "Qiu et al. 2025 (Gated Attention)",
            "an output gate removes attention sinks and massive activations and stabilises "
            "training; no claim about collapse at initialisation",
            note="Measured: as the baseline. The gate (about 0.5 at initialisation) rescales each "
                 "head's output, which neither the attention entropy nor res(X) sees.",
            witnesses=witnesses_at("gated", RANK, ENTROPY),
        ),
    )
    # Qiu et al. 2025's best gate (G1, elementwise), as in Qwen3-Next and timm's gated=True.
    presets = {"gated": {"gated": "elementwise"}}
    output_order = 1  # gates the attention output, so after corrections that complete it

    def __init__(self, mode: str, config: AttentionConfig):
        super().__init__()
        self.mode = mode
        self.num_heads = config.num_heads
        width = config.attn_dim if mode == "elementwise" else config.num_heads
        self.gate = nn.Linear(config.dim, width, bias=config.qkv_bias, **config.factory_kwargs)

    @classmethod
    def from_option(cls, value: Any, config: AttentionConfig) -> Gated | None:
        if value is None or value is False:
            return None
        if value is True:
            value = "elementwise"
        if value not in GATE_MODES:
            raise ValueError(f"gated={value!r}: expected 'elementwise' (or True), 'headwise' "
                             f"or None")
        return cls(value, config)

    def saved_value(self) -> str:
        return self.mode

    def gates(self, x: Tensor) -> Tensor:
        """sigmoid(x W_g + b_g) per head: (B, H, N, D) elementwise, (B, H, N, 1) headwise."""
        return rearrange(torch.sigmoid(self.gate(x)), "b n (h d) -> b h n d", h=self.num_heads)

    def transform_output(self, attended: Attended, call: AttentionCall) -> Tensor:
        return attended.out * self.gates(call.x)

    def health(self, layers: HostLayers, call: AttentionCall | None = None) -> dict[str, Tensor]:
        if call is None:
            return {}
        return {"mean": self.gates(call.x).mean(dim=(0, 2, 3), dtype=torch.float32)}

    def keeps_function(self, source: nn.Module) -> bool:
        return getattr(source, "gate", None) is not None  # the source's own gate, moved over

    def timm_expressible(self, host: nn.Module) -> bool:
        """timm's gated=True is an elementwise gate applied after scale_norm: the same only
        without scale_norm. timm's DiffAttention has no gate."""
        if getattr(getattr(host, "timm_origin", None), "kind", None) == "DiffAttention":
            return False
        return self.mode == "elementwise" and isinstance(host.norm, nn.Identity)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"

"""Rotary position embedding (RoPE) as a q/k transform, as timm's AttentionRope and EVA apply it.

    q_i <- q_i * cos_i + rot(q_i) * sin_i,    k_j <- k_j * cos_j + rot(k_j) * sin_j

Su et al. (2021), "RoFormer: Enhanced Transformer with Rotary Position
Embedding" (arXiv:2104.09864), eq. (34): the rotation R_i of each 2-d pair of
channels makes the logit (R_i q_i)^T (R_j k_j) = q_i^T R_(j-i) k_j depend on
positions only through j - i (axial 2-d variants for images: Heo et al. 2024,
"Rotary Position Embedding for Vision Transformer").

Layout, as timm (``timm.layers.pos_embed_sincos.apply_rot_embed_cat`` and the
forward of ``timm.layers.AttentionRope`` / ``timm.models.eva.EvaAttention``):

  * the embedding is given per call, ``emb = cat([sin, cos], -1)``, broadcastable
    to (B, H, N - P, 2 D) for the N - P tokens after the first P
    (``num_prefix_tokens``: class and register tokens, left unrotated);
  * ``rotate_half=False`` (interleaved pairs): rot(x) = [-x1, x0, -x3, x2, ...];
    ``rotate_half=True``: rot(x) = [-x_(D/2) .. -x_(D-1), x_0 .. x_(D/2-1)];
  * products in the promoted dtype (sin/cos usually float32), the result cast
    back to the dtype of q and k.

It runs after q_norm / k_norm and before key/value extras, so prepended sink
keys stay unrotated (position-free), and the probe measures rotated q and k.
No parameters and no health of its own. The embedding comes with each call
(``AttentionCall.rope``: ``RobustAttentionRope``, :mod:`robust_attn.integrations.timm.rope_attention`,
passes its ``rope`` argument); with no embedding (``rope=None``) it is the identity, as in timm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..config import AttentionConfig
from .base import Mitigation

if TYPE_CHECKING:
    from ..call import AttentionCall


@dataclass(frozen=True)
class RopeLayout:
    """Where and how the rotation applies: timm's ``num_prefix_tokens`` and ``rotate_half``."""

    num_prefix_tokens: int = 1
    rotate_half: bool = False

    def __post_init__(self) -> None:
        if (isinstance(self.num_prefix_tokens, bool) or not isinstance(self.num_prefix_tokens, int)
                or self.num_prefix_tokens < 0):
            raise ValueError(f"num_prefix_tokens={self.num_prefix_tokens!r}: expected an integer "
                             f">= 0")
        if not isinstance(self.rotate_half, bool):
            raise ValueError(f"rotate_half={self.rotate_half!r}: expected True or False")


def rotate_pairs(x: Tensor, rotate_half: bool) -> Tensor:
    """rot(x): [-x1, x0, -x3, x2, ...] (interleaved) or [-x_second_half, x_first_half] (half)."""
    if rotate_half:
        first, second = x.chunk(2, dim=-1)
        return torch.cat([-second, first], dim=-1)
    return torch.stack([-x[..., 1::2], x[..., ::2]], dim=-1).reshape(x.shape)


def apply_rotary(x: Tensor, embedding: Tensor, layout: RopeLayout) -> Tensor:
    """x * cos + rot(x) * sin on the tokens after the prefix, in x's dtype; x is (B, H, N, D)."""
    prefix, tokens = x[..., :layout.num_prefix_tokens, :], x[..., layout.num_prefix_tokens:, :]
    sin, cos = embedding.chunk(2, dim=-1)
    rotated = (tokens * cos + rotate_pairs(tokens, layout.rotate_half) * sin).to(x.dtype)
    return torch.cat([prefix, rotated], dim=-2)


class RotaryEmbedding(Mitigation):
    """Option ``rope``: True (timm's defaults: one prefix token, interleaved) or a RopeLayout."""

    option = "rope"
    conflicts = {"spectral_qk": "RoPE rotates q and k by position, so the logits are "
                                "x_i^T W_Q^T R_(j-i) W_K x_j, not the bilinear form whose "
                                "eigenspectrum spectral_qk shapes"}

    def __init__(self, layout: RopeLayout):
        super().__init__()
        self.layout = layout

    @classmethod
    def from_option(cls, value: Any, config: AttentionConfig) -> RotaryEmbedding | None:
        if value is None or value is False:
            return None
        if value is True:
            return cls(RopeLayout())
        if not isinstance(value, RopeLayout):
            raise ValueError(f"rope={value!r}: expected True, a RopeLayout or None")
        return cls(value)

    def saved_value(self) -> tuple[int, bool]:
        return (self.layout.num_prefix_tokens, self.layout.rotate_half)

    def transform_qk(self, q: Tensor, k: Tensor, call: AttentionCall) -> tuple[Tensor, Tensor]:
        if call.rope is None:
            return q, k
        return apply_rotary(q, call.rope, self.layout), apply_rotary(k, call.rope, self.layout)

    def keeps_function(self, source) -> bool:
        return True  # the source's own RoPE (timm's AttentionRope, EvaAttention)

    def timm_expressible(self, host) -> bool:
        return True

    def extra_repr(self) -> str:
        return (f"num_prefix_tokens={self.layout.num_prefix_tokens}, "
                f"rotate_half={self.layout.rotate_half}")

"""RobustAttentionRope: RobustAttention with the forward of timm's AttentionRope and EvaAttention.

    forward(x, rope=None, attn_mask=None, is_causal=False)

``rope`` is the per-call embedding ``cat([sin, cos], -1)`` that timm's EVA
models compute once per forward and hand to every block; it travels in the call
record (``AttentionCall.rope``) to the RoPE mitigation
(:mod:`robust_attn.mitigations.rope`), which applies it to q and k after q_norm/k_norm,
before any other mitigation's q/k transform, exactly where timm applies it.

``key_bias=False`` matches EVA, whose key projection has no bias (timm keeps
``k_bias`` a zero buffer) while its q and v biases are learned: the fused qkv
bias's key third is then held at zero, reset under no_grad at every forward,
so the optimiser's updates to it never reach the output and the module stays
expressible as an EvaAttention (:func:`robust_attn.revert`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ...attention import RobustAttention
from ...mitigations.rope import RopeLayout


class RobustAttentionRope(RobustAttention):
    """RobustAttention taking timm's ``rope`` argument.

    Args: those of :class:`~robust_attn.RobustAttention`, plus
        num_prefix_tokens: leading tokens (class, registers) left unrotated.
        rotate_half: timm's 'half' rotation layout instead of interleaved pairs.
        key_bias: False holds the key third of the qkv bias at zero (EVA).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, num_prefix_tokens: int = 1,
                 rotate_half: bool = False, key_bias: bool = True, **kwargs: Any) -> None:
        # rope first among the options, so RoPE runs right after q_norm/k_norm, as in timm.
        super().__init__(dim, num_heads, rope=RopeLayout(num_prefix_tokens, rotate_half), **kwargs)
        self.key_bias = key_bias

    def forward(self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None,
                is_causal: bool = False) -> Tensor:
        if not self.key_bias and self.qkv.bias is not None:
            with torch.no_grad():
                self.qkv.bias[self.attn_dim:2 * self.attn_dim].zero_()
        return self.attention(x, attn_mask, is_causal, rope=rope)

    def extra_repr(self) -> str:
        return super().extra_repr() + ("" if self.key_bias else ", key_bias=False")

"""Attention logit soft-capping: s -> cap * tanh(s / cap).

Bounds every attention logit to (-cap, cap), so no logit can grow without
bound and drive the softmax one-hot (entropy collapse through logit growth,
Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
training instabilities"). Used for attention logits with cap = 50 in Gemma 2
(Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical
Size", ``attn_logit_softcapping = 50.0``), and with cap = 30 in Grok-1.

Applied to scale * q k^T before the mask, as a FlexAttention score_mod.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..config import AttentionConfig
from ..problem import ScoreMod
from .base import Mitigation


@dataclass(frozen=True)
class TanhSoftCap:
    """The score_mod cap * tanh(score / cap) (a value, so modules stay picklable)."""

    cap: float

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.cap * torch.tanh(score / self.cap)


class SoftCap(Mitigation):
    option = "softcap"
    conflicts = {"sigmoid": "soft-capping bounds softmax logits; sigmoid attention has no softmax"}

    def __init__(self, cap: float):
        super().__init__()
        self.cap = float(cap)

    @classmethod
    def from_option(cls, value: Any, config: AttentionConfig) -> SoftCap | None:
        if value is None or value is False:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"softcap={value!r}: expected a positive cap such as 50.0, or None")
        return cls(value)

    def score_mod(self) -> ScoreMod:
        return TanhSoftCap(self.cap)

    def extra_repr(self) -> str:
        return f"cap={self.cap}"

"""Attention logit soft-capping: s -> cap * tanh(s / cap).

Bounds every attention logit to (-cap, cap), so no logit can grow without
bound and drive the softmax one-hot (entropy collapse through logit growth,
Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
training instabilities"). Used for attention logits with cap = 50 in Gemma 2
(Gemma Team 2024, "Gemma 2: Improving Open Language Models at a Practical
Size", ``attn_logit_softcapping = 50.0``), and with cap = 30 in Grok-1.

Applied to scale * q k^T before the mask, as a FlexAttention score_mod.

The cap must lie in [MIN_CAP, MAX_CAP] = [0.01, 2**15] (our choice): both ends
are normal float16 numbers, so cap and score / cap stay finite in every dtype
(an infinite cap gave 0 * inf = nan; float16 rounds caps above 65504 to inf and
below 6e-8 to 0). Logits above 2**15 are refused in float16 anyway
(:mod:`robust_attn.logit_limit`), and a cap below 0.01 makes attention uniform.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..claim import ENTROPY, RANK, Claim, witness_at
from ..config import AttentionConfig
from ..problem import ScoreMod
from .base import Mitigation

MIN_CAP = 0.01
MAX_CAP = 2.0 ** 15


@dataclass(frozen=True)
class TanhSoftCap:
    """The score_mod cap * tanh(score / cap) (a value, so modules stay picklable)."""

    cap: float

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return self.cap * torch.tanh(score / self.cap)


class SoftCap(Mitigation):
    option = "softcap"
    # Early warnings: code -> (rank among the presets suggested for it, 1 first; why it helps).
    advice_preset = 'softcap'
    advice = {
        'logit_growth': (2, 'softcap bounds logits at 50'),
        'divergence': (2, 'so does a cap on them'),
    }
    claims = (
        Claim(
            "softcap", "Gemma Team 2024 (Gemma 2); Wortsman et al. 2023",
            "capping the logits at 50 (cap * tanh(s / cap)) prevents logit growth, hence entropy "
            "collapse",
            note="Measured: neither as a guarantee. The cap bounds each logit to (-50, 50), but a "
                 "row whose logits spread over that range is still one-hot (differences up to "
                 "100). Where most logits saturate at the cap (the table's width-32 heads at "
                 "sqk 16) many tie there and H stays 0.2-0.45; narrow heads still collapse (one "
                 "head of width 8, sqk 14, depth 48: H < 0.1, the witness). The source's claim is "
                 "about logits growing in training, which the cap does bound.",
            witnesses={RANK: witness_at("softcap", RANK),
                       ENTROPY: witness_at("softcap", ENTROPY, qk_scale=14.0, depth=48, dim=8,
                                         num_heads=1, tokens=8, seed=0)},
        ),
    )
    presets = {"softcap": {"softcap": 50.0}}  # Gemma 2's cap
    conflicts = {"sigmoid": "soft-capping bounds softmax logits; sigmoid attention has no softmax"}

    def __init__(self, cap: float):
        super().__init__()
        self.cap = float(cap)

    @classmethod
    def from_option(cls, value: Any, config: AttentionConfig) -> SoftCap | None:
        if value is None or value is False:
            return None
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or not MIN_CAP <= value <= MAX_CAP):
            raise ValueError(f"softcap={value!r}: expected a cap in [{MIN_CAP}, {MAX_CAP:g}] such "
                             f"as 50.0, or None")
        return cls(value)

    def saved_value(self) -> float:
        return self.cap

    def score_mod(self) -> ScoreMod:
        return TanhSoftCap(self.cap)

    def extra_repr(self) -> str:
        return f"cap={self.cap}"

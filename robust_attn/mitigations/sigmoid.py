"""Sigmoid attention: each weight is an independent sigmoid instead of a softmax over the row.

    A_ij = sigmoid(scale * q_i . k_j + b),    b = -log(Nk) by default;  out = A V

Ramapuram et al. (2025), "Theory, Analysis, and Best Practices for Sigmoid
Self-Attention" (ICLR 2025). Rows need not sum to one, so no key competes with
another and no sink is needed to absorb mass; b = -log(n) makes every weight
about 1/n at initialisation, like uniform softmax attention, which together
with normalised queries and keys is what the paper finds stabilises training
(the large initial attention norms are the failure). The authors' code
(github.com/apple/ml-sigmoid-attention, ``layers/attention.py``) adds b as a
constant ``attn_bias`` after masking.

``sigmoid=`` one of:

    True      b = -log(Nk), Nk the number of keys of each call (padded and
              prepended keys included), so b follows the sequence length.
    a float   a fixed b (e.g. -log of the training length, to keep b fixed when
              the length changes at inference), in [-MAX_BIAS, MAX_BIAS] =
              [-1e4, 1e4] (our choice): scores + b then stays finite in float16
              (largest 65504) for every logit below its float16 limit of 2**15;
              -log(N) is about -21 at N = 1e9.

Score modifiers still apply to scale * q k^T; blocked keys (-inf) get weight
sigmoid(-inf) = 0, so a row with no allowed key outputs zero. b lives in the
normalizer, not in a score modifier, because score modifiers (FlexAttention's
signature) do not see the number of keys. The chunked and eager kernels
compute sigmoid attention (:mod:`robust_attn.kernels`): ``kernel='auto'``
picks the chunked one, which never materialises the whole matrix of a long
sequence, and forcing 'sdpa', 'flex' or 'xformers' raises ValueError. The
``sigmoid`` preset turns ``qk_norm`` on, as the paper recommends. Options that
assume softmax (sink tokens, sink logit, softcap, outlier removal) refuse to
combine with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..claim import (
    BASELINE_ENTROPY_COLLAPSE,
    ENTROPY,
    ENTROPY_COLLAPSE,
    RANK,
    Claim,
    Guarantee,
    Setting,
    witnesses_at,
)
from ..config import AttentionConfig
from .base import Mitigation

MAX_BIAS = 1e4


@dataclass(frozen=True)
class SigmoidWeights:
    """The normalizer sigmoid(scores + b), b = -log(Nk) when ``bias`` is None; picklable."""

    bias: float | None = None
    name = "sigmoid"

    def __call__(self, scores: Tensor) -> Tensor:
        bias = -math.log(scores.shape[-1]) if self.bias is None else self.bias
        return torch.sigmoid(scores + bias)


class Sigmoid(Mitigation):
    option = "sigmoid"
    claims = (
        Claim(
            "sigmoid", "Ramapuram et al. 2025, ICLR (sigmoid self-attention)",
            "independent sigmoid weights with b = -log N and qk-norm avoid the large initial "
            "attention norms that destabilise training",
            (Guarantee(ENTROPY, Setting((True,), BASELINE_ENTROPY_COLLAPSE.qk_scales),
                       ENTROPY_COLLAPSE),),
            note="H of a sigmoid row is the entropy of the row divided by its sum (the probe "
                 "normalises rows that are not distributions). Guaranteed, and property-tested, "
                 "with residual connections; attention-only stacks also keep H 0.897 at the "
                 "table's points, but the guarantee is stated only where the property test covers "
                 "it. The preset includes qk_norm, which is "
                 "what keeps the logits bounded. Not against rank collapse: attention-only stacks "
                 "collapse in rank.",
            witnesses=witnesses_at("sigmoid", RANK),
        ),
    )
    # b = -log(Nk), with qk_norm as the paper recommends for stability.
    presets = {"sigmoid": {"sigmoid": True, "qk_norm": True}}

    def __init__(self, bias: float | None):
        super().__init__()
        self.bias = bias

    @classmethod
    def from_option(cls, value: Any, config: AttentionConfig) -> Sigmoid | None:
        if value is None or value is False:
            return None
        if value is True:
            return cls(None)
        if (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and -MAX_BIAS <= value <= MAX_BIAS):
            return cls(float(value))
        raise ValueError(f"sigmoid={value!r}: expected True (bias -log(number of keys)), a bias in "
                         f"[{-MAX_BIAS:g}, {MAX_BIAS:g}] such as -5.0, or None")

    def saved_value(self) -> float | str:
        return "-log(num_keys)" if self.bias is None else self.bias

    def normalizer(self) -> SigmoidWeights:
        return SigmoidWeights(self.bias)

    def extra_repr(self) -> str:
        return "bias=-log(num_keys)" if self.bias is None else f"bias={self.bias}"

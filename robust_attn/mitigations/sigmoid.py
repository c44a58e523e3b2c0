"""Sigmoid attention: each weight is an independent sigmoid instead of a softmax over the row.

    A_ij = sigmoid(scale * q_i . k_j + b_i),    b_i = -log(n_i) by default;  out = A V

n_i is the number of keys query row i may attend to (its mask and causality allow).

Ramapuram et al. (2025), "Theory, Analysis, and Best Practices for Sigmoid
Self-Attention" (ICLR 2025). Rows need not sum to one, so no key competes with
another and no sink is needed to absorb mass; b = -log(n) makes every weight
about 1/n at initialisation, like uniform softmax attention, which together
with normalised queries and keys is what the paper finds stabilises training
(the large initial attention norms are the failure). The authors' code
(github.com/apple/ml-sigmoid-attention, ``layers/attention.py``) adds b as a
constant ``attn_bias`` after masking.

``sigmoid=`` one of:

    True      b_i = -log(n_i), n_i the keys row i may see: Nk when nothing
              blocks keys; under causality and masks only the allowed ones
              (at least 1), so a causal row's output never depends on the
              tokens after it, and cached decoding (one query, every cached
              key allowed) equals a full causal forward. Keys that a sparsity
              pattern or block_topk's selection blocks still count (as
              scalable_softmax's n: the call's mask and causality only, so the
              result does not depend on the order of the options).
    a float   a fixed b (e.g. -log of the training length, to keep b fixed when
              the length changes at inference), in [-MAX_BIAS, MAX_BIAS] =
              [-1e4, 1e4] (our choice): scores + b then stays finite in float16
              (largest 65504) for every logit below its float16 limit of 2**15;
              -log(N) is about -21 at N = 1e9.

**Causal models: our deviation.** The paper's b = -log(n) is one constant per
sequence length; the authors' language models fix it from a configured length
(their configs: ``attn_bias: -10``, or "-ln(8192)" for training at 1024 tokens
and evaluating up to 8192). Counting every key of the call instead, as this
option did before, made a causal token's output depend on the sequence length
after it (a full forward differed from cached decoding). For the paper's own
choice pass that constant as a float (e.g. ``sigmoid=-math.log(train_length)``);
``True`` counts per row, which equals -log(Nk) wherever every row sees every key
(the unmasked, non-causal case the paper's analysis assumes).

Checkpoints: ``True`` saves "-log(num_keys)" as before, and unmasked, non-causal models
compute what they did. A causal or masked model trained with the earlier ``True`` (every row
-log(Nk) of its call) computes differently now on the rows that saw fewer than Nk keys; at the
training length, ``sigmoid=-math.log(train_length)`` reproduces what it was trained with.

Score modifiers still apply to scale * q k^T; blocked keys (-inf) get weight
sigmoid(-inf) = 0, so a row with no allowed key outputs zero. An unmasked,
non-causal call's b = -log(Nk) lives in the normalizer; otherwise the problem
stage (:meth:`Sigmoid.extend_keys`) counts each row's allowed keys and adds
-log(n_i) as a score modifier (:class:`RowBias`, indexed by batch, head and query
row, so kernels that take the problem's ``score_mod()`` need no change), with a
normalizer of bias 0. The chunked and eager kernels
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
from typing import TYPE_CHECKING, Any

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
from ..problem import AttentionProblem, allowed_key_counts
from .base import Mitigation

if TYPE_CHECKING:
    from ..call import AttentionCall

MAX_BIAS = 1e4


@dataclass(frozen=True)
class SigmoidWeights:
    """The normalizer sigmoid(scores + b), b = -log(Nk) when ``bias`` is None; picklable."""

    bias: float | None = None
    name = "sigmoid"

    def __call__(self, scores: Tensor) -> Tensor:
        bias = -math.log(scores.shape[-1]) if self.bias is None else self.bias
        return torch.sigmoid(scores + bias) if bias else torch.sigmoid(scores)

    def elementwise(self, num_keys: int) -> SigmoidWeights:
        """The same weights on any part of a row of ``num_keys`` keys: the bias fixed to that
        row's -log(Nk) (the normalizer protocol: robust_attn.problem.AttentionProblem)."""
        return self if self.bias is not None else SigmoidWeights(-math.log(max(num_keys, 1)))


@dataclass(frozen=True, eq=False)
class RowBias:
    """The score modifier score - log(n_i): ``log_counts`` (B, H, Nq), log of the keys each query
    row may see, read at the kernel's (b, h, q_idx); a constant (no gradient)."""

    log_counts: Tensor

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return score - self.log_counts[b, h, q_idx]


def allowed_keys(problem: AttentionProblem, call: AttentionCall) -> Tensor | None:
    """How many keys each query row may attend to under the call's mask and causality, at least
    1, float (B|1, H|1, Nq); None when neither blocks a key (every row sees Nk). The call's mask,
    not the problem's: a mask another mitigation's problem stage adds does not count, whatever
    the order of the options. Linear in N without an (Nq, Nk) mask
    (:func:`robust_attn.problem.allowed_key_counts`)."""
    counts = allowed_key_counts(problem.num_queries, problem.num_keys, call.attn_mask,
                                problem.causal, problem.q.device)
    return None if counts is None else counts.squeeze(-1).float().clamp(min=1)


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

    def extend_keys(self, problem: AttentionProblem, call: AttentionCall) -> AttentionProblem:
        """With b = -log(n_i) and a mask or causality: each row's own count as a score modifier
        (module docstring), the normalizer's bias 0."""
        counts = None if self.bias is not None else allowed_keys(problem, call)
        if counts is None:
            return problem
        batch, heads = problem.q.shape[:2]
        log_counts = counts.to(problem.q.dtype).log().expand(batch, heads, problem.num_queries)
        return problem.with_(score_mods=(*problem.score_mods, RowBias(log_counts)),
                             normalizer=SigmoidWeights(0.0))

    def extra_repr(self) -> str:
        return "bias=-log(num_keys)" if self.bias is None else f"bias={self.bias}"

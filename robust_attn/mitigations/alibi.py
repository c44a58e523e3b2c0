"""ALiBi: attention with linear biases, a fixed per-head penalty on the distance between tokens.

    s_ij <- s_ij - m_h |i - j|          (i: the query's position, j: the key's, h: the head)

Press, Smith & Lewis (2022), "Train Short, Test Long: Attention with Linear
Biases Enables Input Length Extrapolation" (ICLR 2022, arXiv:2108.12409): no
position embeddings; instead each head adds the bias -m_h (i - j) to the score of
query i and key j <= i of a causal language model, with fixed (not learned)
slopes m_h. Under causal attention every allowed key has j <= i, where
-m_h |i - j| = -m_h (i - j): the paper's bias exactly.

**Non-causal attention (a documented deviation).** The paper only trains causal
language models. For attention without the causal mask (ViT, BERT-like
encoders) we apply the same formula to every key, -m_h |i - j|: the symmetric
bias, which the paper's first author gives for encoder attention
(ofirpress/attention_with_linear_biases, issue #5, "Modifying ALiBi for
Encoder-Attention or Cross-Attention") and which data2vec 2.0 (Baevski et al.
2023) and BERT-style models with ALiBi use. The sequence is 1-D: an image's
patches are penalised by their distance in raster order and a class token by its
index (2-D variants are not implemented here).

**Slopes.** ``alibi=True``: the paper's, for H heads a geometric sequence that
starts at 2^(-8/H) with ratio 2^(-8/H), m_h = 2^(-8 (h + 1) / H) (h = 0 .. H-1:
1/2, 1/4, .., 1/256 for 8 heads). For H not a power of 2 the authors' code
(``get_slopes`` in ``fairseq/models/transformer.py`` of
ofirpress/attention_with_linear_biases) takes the P = 2^floor(log2 H) slopes
of P heads, then every other slope of the 2P-head sequence, starting with its
first, for the remaining H - P heads (6 heads: 2^-2, 2^-4, 2^-6, 2^-8, 2^-1,
2^-3); :func:`alibi_slopes` computes exactly these sequences, in closed form.
``alibi=(m_0, .., m_(H-1))``: your own slopes, one finite m_h >= 0 per head (0
turns a head's bias off).

**Form of the bias.** The authors' code adds m_h j (the same row for every
query, Figure 3's matrix shifted by the constant m_h i per row): softmax does
not see a per-row constant, so it computes what -m_h (i - j) computes. We add
-m_h |i - j| itself, which is 0 on each query's own key and never positive,
so it also means the paper's bias under normalizers that do see per-row
constants (sigmoid attention).

**Positions.** The score modifier is positional (``AlibiBias.positional``,
:mod:`robust_attn.problem`): i and j are token positions, aligned lower-right
when there are fewer queries than keys (query i of Nq is at position
i + Nk - Nq), and keys prepended by other mitigations (sink tokens, a sink
logit's key) have no position and get no bias. User masks, causality and
sparsity patterns still block what they block; the bias only changes the
scores of the allowed keys.

**Kernels and order.** The bias is a FlexAttention score_mod: FlexAttention
(CUDA) and the chunked and eager kernels compute it without materialising a
bias tensor; SDPA and xformers take no score modifier, so ``kernel="auto"``
picks the chunked kernel on the CPU. It is added after the position-free score
modifiers (``score_order = 1``: softcap caps the content logit q.k, then the
distance penalty is added, so a cap does not flatten it), whatever the order of
the options.

No parameters, buffers or health of its own: a module with ALiBi has the same
state dict as one without, and the slopes are recorded in its checkpoint
metadata (:meth:`Alibi.saved_value`: True for the paper's slopes, else the
tuple). In float16 on the eager and chunked kernels (FlexAttention adds it to
float32 scores), a bias beyond the largest float16 number (m_h |i - j| >
65504, e.g. m = 1/2 and |i - j| > 131008) becomes -inf, i.e. the key is
blocked.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..claim import ENTROPY, RANK, Claim, witnesses_at
from ..config import AttentionConfig
from ..problem import ScoreMod
from .base import Mitigation


def alibi_slopes(num_heads: int) -> tuple[float, ...]:
    """The paper's slopes for ``num_heads`` heads (module docstring): m_h = 2^(-8 (h + 1) / H) for
    H a power of 2; otherwise the P = 2^floor(log2 H) slopes of P heads followed by the first
    H - P of every other slope of 2P heads, 2^(-4 (2 k + 1) / P), as the authors' code does."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads={num_heads!r}: expected a positive integer")
    power = 2 ** (num_heads.bit_length() - 1)  # the largest power of 2 <= num_heads
    slopes = [2.0 ** (-8.0 * (h + 1) / power) for h in range(power)]
    slopes += [2.0 ** (-4.0 * (2 * k + 1) / power) for k in range(num_heads - power)]
    return tuple(slopes)


@dataclass(frozen=True)
class AlibiBias:
    """The score_mod score - m_h |q_idx - kv_idx| (a value, so modules stay picklable).

    Positional: the problem hands it token positions and keeps it off prepended keys. The head's
    slope is selected from ``slopes`` by comparisons with h (no tensor is created inside, which
    FlexAttention's compiled score_mod cannot lower; h is one number per FlexAttention program,
    a (1, H, 1, 1) index in the eager kernels). The bias is computed in float32 (float64 for
    float64 scores) and then cast to the scores' dtype."""

    slopes: tuple[float, ...]
    positional: ClassVar[bool] = True

    def __call__(self, score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        dtype = torch.promote_types(score.dtype, torch.float32)
        slope = torch.full_like(h, self.slopes[0], dtype=dtype)
        for head, value in enumerate(self.slopes[1:], start=1):
            slope = torch.where(h == head, value, slope)
        distance = (q_idx - kv_idx).abs().to(dtype)
        return score - (slope * distance).to(score.dtype)


class Alibi(Mitigation):
    """Option ``alibi``: True (the paper's slopes) or a tuple of H slopes (module docstring)."""

    option = "alibi"
    presets = {"alibi": {"alibi": True}}
    score_order = 1  # a bias added to the finished logits: after softcap (module docstring)
    claims = (
        Claim(
            "alibi", "Press, Smith & Lewis 2022, ICLR (ALiBi, arXiv:2108.12409)",
            "a fixed linear distance bias replaces position embeddings and lets a causal LM "
            "trained on short sequences extrapolate to longer ones; no claim about collapse at "
            "initialisation",
            note="Measured: neither. The bias is at most m_h (N - 1) (0.25 x 63 = 16 for the "
                 "steepest of 4 heads over 64 tokens, 0.25 for the flattest), and makes rows "
                 "local by design (worst-layer H 0.895 at sqk 1, the baseline's 0.987). In "
                 "attention-only stacks it slows rank collapse without preventing it: at sqk 1, "
                 "4 heads, 64 tokens, res(X) is about 6e-2, 5e-4, 7e-7 and 2e-7 after 4, 12, 24 "
                 "and 48 layers, where the baseline's is 1e-7 from depth 4; more tokens and "
                 "heads (steeper slopes) slow it further (16 heads, 256 tokens: 4e-3 at depth "
                 "24, 5e-5 at 48), fewer tokens less (16 tokens: 2e-7 by depth 24). At sqk 16 "
                 "the QK logits (standard deviation about 85) dwarf the bias: rows go one-hot "
                 "as the baseline's (entropy collapse), and attention-only stacks keep res(X) "
                 "about 1e-4 (the baseline's 2e-7), far below 0.01. Stacks here are not causal, "
                 "so they use the symmetric bias -m_h |i - j| (the module's docstring).",
            witnesses=witnesses_at("alibi", RANK, ENTROPY),
        ),
    )

    def __init__(self, slopes: tuple[float, ...]):
        super().__init__()
        self.slopes = tuple(float(slope) for slope in slopes)

    @classmethod
    def from_option(cls, value: Any, config: AttentionConfig) -> Alibi | None:
        if value is None or value is False:
            return None
        if value is True:
            return cls(alibi_slopes(config.num_heads))
        expected = (f"expected True (the paper's slopes) or a tuple of {config.num_heads} finite "
                    f"slopes >= 0, one per head")
        if not isinstance(value, (tuple, list)) or len(value) != config.num_heads:
            raise ValueError(f"alibi={value!r}: {expected}")
        for slope in value:
            if (isinstance(slope, bool) or not isinstance(slope, (int, float))
                    or not math.isfinite(slope) or slope < 0):
                raise ValueError(f"alibi={value!r}: slope {slope!r} is not a finite number >= 0; "
                                 f"{expected}")
        return cls(tuple(value))

    @property
    def is_papers(self) -> bool:
        """Whether the slopes are the paper's for this many heads."""
        return self.slopes == alibi_slopes(len(self.slopes))

    def saved_value(self) -> bool | tuple[float, ...]:
        """True for the paper's slopes (given as True or as that tuple), else the slopes."""
        return True if self.is_papers else self.slopes

    def score_mod(self) -> ScoreMod:
        return AlibiBias(self.slopes)

    def extra_repr(self) -> str:
        slopes = ", ".join(f"{slope:.6g}" for slope in self.slopes)
        return f"slopes=({slopes})" + (" (the paper's)" if self.is_papers else "")

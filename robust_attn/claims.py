"""What each preset claims against collapse at initialisation, as data: the README's claims table.

The two failure modes (DESIGN.md), measured on :mod:`robust_attn.stack`'s deep
pre-LN stacks at initialisation, W_q, W_k ~ N(0, sqk^2 / C):

    entropy collapse   the worst layer's mean normalised attention entropy H < bound
    rank collapse      res(X) = ||X - 1 mean(X)^T||_F / ||X||_F of the output < bound

A :class:`Claim` says which failures a preset addresses ('entropy collapse',
'rank collapse', 'both' or 'neither') and, for each, a :class:`Guarantee`: the
:class:`Setting` (stack kind, QK scales, depths, tokens, heads and head widths)
and the bound. Every guarantee is tested where the baseline fails:
``tests/test_collapse_claims.py`` draws stacks from the setting with hypothesis
(:func:`robust_attn.testing.strategies.stack_settings`) and shows, on each draw,
the preset at or above the bound and the baseline below it. For each failure a
preset does not address, a witness stack shows it failing where the baseline
does. ``benchmarks/claims_table.py`` measures every preset at DESIGN.md's
depth-24 point.

Each claim starts from its source's claim and is then measured; where our
measurement disagrees, the claim is narrowed or is 'neither', and ``note``
says what the source claims and what we measured. The bounds are the
thresholds of the stack's verdicts (``robust_attn.stack.ENTROPY_COLLAPSE``,
``RANK_COLLAPSE``), so "addresses" means "the verdict stays healthy".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from .stack import ENTROPY_COLLAPSE, RANK_COLLAPSE, StackSetting

ENTROPY = "entropy collapse"
RANK = "rank collapse"
ATTENTION_ONLY = (False,)
EITHER_STACK = (False, True)


@dataclass(frozen=True)
class Setting:
    """Stacks at initialisation: residual connections (each value listed is drawn), closed
    ranges of the QK weight scale sqk, the depth, the number of tokens and of heads, and the
    head widths drawn (model width = heads x head width).

    At least 8 tokens: with fewer, a layer's mean entropy is a mean over 4 to 7 query
    rows, one near-tie row lifts it by about 0.5 / N, and even the baseline stays above
    H = 0.1 on some draws (measured: 0.125 at 4 tokens, sqk 7.4).
    """

    residual: tuple[bool, ...]
    qk_scales: tuple[float, float]
    depths: tuple[int, int] = (8, 48)
    tokens: tuple[int, int] = (8, 32)
    heads: tuple[int, int] = (1, 4)
    head_dims: tuple[int, ...] = (8, 12, 16)


@dataclass(frozen=True)
class Guarantee:
    """In ``setting``, the preset's measure of ``failure`` stays >= ``bound`` (the baseline's
    falls below it): the worst-layer entropy for ENTROPY, the output's res(X) for RANK."""

    failure: str
    setting: Setting
    bound: float


@dataclass(frozen=True)
class Claim:
    """A preset's claim at initialisation: what its source claims, what we guarantee, and for
    each failure it does not address, a witness: a stack, inside the setting where the baseline
    fails that way, in which the preset fails too (so 'neither' is measured, not assumed)."""

    variant: str
    source: str
    source_claim: str
    guarantees: tuple[Guarantee, ...] = ()
    note: str = ""
    witnesses: Mapping[str, StackSetting] = field(default_factory=dict, hash=False)

    @property
    def addresses(self) -> str:
        """'entropy collapse', 'rank collapse', 'both' or 'neither'."""
        failures = {guarantee.failure for guarantee in self.guarantees}
        return "both" if failures == {ENTROPY, RANK} else next(iter(failures), "neither")


# Where the baseline itself fails, on every draw (measured; see the baseline's note).
BASELINE_ENTROPY_COLLAPSE = Setting(residual=EITHER_STACK, qk_scales=(6.0, 32.0))
BASELINE_RANK_COLLAPSE = Setting(residual=ATTENTION_ONLY, qk_scales=(0.5, 1.25))

_NO_ENTROPY_COLLAPSE = Guarantee(ENTROPY, BASELINE_ENTROPY_COLLAPSE, ENTROPY_COLLAPSE)
_NO_RANK_COLLAPSE = Guarantee(RANK, BASELINE_RANK_COLLAPSE, RANK_COLLAPSE)


def _witness(variant: str, failure: str, **changes) -> StackSetting:
    """DESIGN.md's point for ``failure`` (rank: sqk 1, attention only; entropy: sqk 16, with
    residual) at depth 24, width 64, 4 heads, 32 tokens, batch 1, seed 0, with ``changes``."""
    point = {RANK: {"qk_scale": 1.0, "residual": False},
             ENTROPY: {"qk_scale": 16.0, "residual": True}}[failure]
    return StackSetting(**{"variant": variant, "depth": 24, "dim": 64, "num_heads": 4,
                           "tokens": 32, "batch": 1, **point, **changes})


def _witnesses(variant: str, *failures: str) -> dict[str, StackSetting]:
    return {failure: _witness(variant, failure) for failure in failures}


_CLAIMS = (
    Claim(
        "baseline", "Dong et al. 2021; Noci et al. 2022; Zhai et al. 2023",
        "plain softmax attention collapses: in rank without residual connections, in entropy "
        "when the QK logits are large",
        note="The reference. On every draw of 8 to 32 tokens: rank collapse in attention-only "
             "stacks for sqk <= 1.25 (res < 0.01 from depth 8); entropy collapse for sqk >= 6 "
             "(H < 0.1), with or without residual. Residual connections alone keep res > 0.01.",
        witnesses=_witnesses("baseline", RANK, ENTROPY),
    ),
    Claim(
        "qk_norm", "Henry et al. 2020; Dehghani et al. 2023; Wortsman et al. 2023",
        "normalising q and k bounds the attention logits, preventing the logit growth that "
        "collapses attention entropy",
        (_NO_ENTROPY_COLLAPSE,),
        note="Measured worst layer H >= 0.48 for any sqk (the logits no longer see it).",
        witnesses=_witnesses("qk_norm", RANK),
    ),
    Claim(
        "softcap", "Gemma Team 2024 (Gemma 2); Wortsman et al. 2023",
        "capping the logits at 50 (cap * tanh(s / cap)) prevents logit growth, hence entropy "
        "collapse",
        note="Measured: neither at initialisation, on every draw. The cap bounds each logit to "
             "(-50, 50), but a row whose logits spread over that range is still one-hot "
             "(differences up to 100): for 6 <= sqk < 12 most draws fall below H = 0.1; for "
             "sqk >= 12, where many logits saturate at the cap, most keep H >= 0.1, but about 1 "
             "draw in 16 (deep stacks, one head) still falls below. The source's claim is "
             "about logits growing in training, which the cap does bound.",
        witnesses={RANK: _witness("softcap", RANK),
                   ENTROPY: _witness("softcap", ENTROPY, qk_scale=8.0, depth=48, dim=8,
                                     num_heads=1, tokens=8, seed=1)},
    ),
    Claim(
        "sigma_reparam", "Zhai et al. 2023, ICML (sigmaReparam)",
        "W_hat = gamma W / sigma(W) bounds the logits' spectral scale, so attention entropy "
        "cannot collapse (their Theorem 3.1's lower bound)",
        (_NO_ENTROPY_COLLAPSE,),
        note="gamma = 1 (the preset): the initial attention no longer depends on the weight "
             "scale; measured worst layer H >= 0.95. Not against rank collapse.",
        witnesses=_witnesses("sigma_reparam", RANK),
    ),
    Claim(
        "spectral_qk", "Bao, Hataya & Karakida 2024, ICML",
        "a concentrated QK eigenspectrum (small variance, non-zero mean) localises attention "
        "and prevents both rank collapse and entropy collapse",
        note="Measured: neither at initialisation (the stack's W_Q drawn with sqk, then W_K "
             "concentrated from it as the preset does). M_h = c_h I makes each query attend to "
             "itself: where that dominates (sqk >= 1.5) the tokens keep their rank but the rows "
             "are one-hot (H < 0.1 for sqk >= 2: entropy collapse); below, the stack collapses "
             "in rank as the baseline's does. With one head (head width = model width) W_Q^h "
             "is square and ill-conditioned, c_h is near 0 and attention near uniform.",
        witnesses=_witnesses("spectral_qk", RANK, ENTROPY),
    ),
    Claim(
        "sink", "Xiao et al. 2024 (StreamingLLM); Miller 2023; OpenAI 2025 (gpt-oss)",
        "a sink gives attention somewhere to put unneeded mass; no claim about collapse at "
        "initialisation",
        note="Measured: as the baseline. A sink logit of 0 takes a share 1 / (N + 1) of "
             "near-uniform rows and nothing from rows with large logits.",
        witnesses=_witnesses("sink", RANK, ENTROPY),
    ),
    Claim(
        "gated", "Qiu et al. 2025 (Gated Attention)",
        "an output gate removes attention sinks and massive activations and stabilises "
        "training; no claim about collapse at initialisation",
        note="Measured: as the baseline. The gate (about 0.5 at initialisation) rescales each "
             "head's output, which neither the attention entropy nor res(X) sees.",
        witnesses=_witnesses("gated", RANK, ENTROPY),
    ),
    Claim(
        "outlier_removal", "Nait Saada, Naderi & Tanner 2025, ICML (Mind the Gap)",
        "removing the attention matrix's outlier, A - 11^T / N, prevents rank collapse in "
        "depth (and in width)",
        (Guarantee(RANK, Setting(ATTENTION_ONLY, (0.5, 1.25), depths=(8, 10), heads=(3, 4),
                                 head_dims=(16,)), RANK_COLLAPSE),),
        note="Measured: a guarantee only for shallow, wide-enough stacks (depth 8-10, width "
             "48-64: worst res 0.37). Elsewhere it delays rank collapse without preventing it: "
             "a few draws in a hundred fail at depth 8-12 with width 16 or less (e.g. depth 8, "
             "width 16, one head, 8 tokens), about 1 in 10 at depth 24 and 1 in 4 at depth 48 "
             "whatever the width. res(X) drifts from layer to layer, and once the tokens are "
             "nearly alike, A is nearly U and (A - U) V nearly 0, which the next LayerNorm "
             "(eps 1e-5) cannot scale back up, so the output vanishes (X = 0, res 0). Not "
             "against entropy collapse.",
        witnesses=_witnesses("outlier_removal", ENTROPY),
    ),
    Claim(
        "sigmoid", "Ramapuram et al. 2025, ICLR (sigmoid self-attention)",
        "independent sigmoid weights with b = -log N and qk-norm avoid the large initial "
        "attention norms that destabilise training",
        (Guarantee(ENTROPY, Setting((True,), BASELINE_ENTROPY_COLLAPSE.qk_scales),
                   ENTROPY_COLLAPSE),),
        note="H of a sigmoid row is the entropy of the row divided by its sum (the probe "
             "normalises rows that are not distributions). Guaranteed, and property-tested, "
             "with residual connections; in attention-only stacks spot checks also kept "
             "H >= 0.86 (depth 24-48, one to four heads, sqk 6-32), but the guarantee is stated "
             "only where the property test covers it. The preset includes qk_norm, which is "
             "what keeps the logits bounded. Not against rank collapse: attention-only stacks "
             "collapse in rank.",
        witnesses=_witnesses("sigmoid", RANK),
    ),
    Claim(
        "block_sparse", "Parmar et al. 2018; Qiu et al. 2020; Beltagy et al. 2020; Zaheer et al. "
                        "2020",
        "local blocks plus global tokens cut attention's cost to linear in N; no claim about "
        "collapse at initialisation",
        note="Measured: neither. Up to 64 tokens (one block) it is dense attention: as the "
             "baseline. With several full blocks, tokens of different blocks mix only through "
             "the global token, so each block collapses to its own mean and res(X) stays up "
             "(0.7-1.0 at 128 tokens): a partition, not a cure; a small last block still "
             "collapses with the rest (65 tokens: res 2e-7).",
        witnesses=_witnesses("block_sparse", RANK, ENTROPY),
    ),
    Claim(
        "strided", "Child et al. 2019 (Sparse Transformers)",
        "the strided pattern cuts attention's cost to N^2 / 8 scores; no claim about collapse "
        "at initialisation",
        (_NO_RANK_COLLAPSE,),
        note="Measured: keeps res(X) >= 0.6, by partition: query i sees only keys j = i mod 8, "
             "so the 8 residue classes never mix; each collapses to its own mean (rank <= 8, "
             "not 1). With fewer than 8 tokens each class is one token, and the per-token maps "
             "alone align them over depth (res 0.012 at depth 40). Not against entropy "
             "collapse (rows of N / 8 keys still go one-hot; rows of one key count as H = 1).",
        witnesses=_witnesses("strided", ENTROPY),
    ),
)

CLAIMS: Mapping[str, Claim] = MappingProxyType({claim.variant: claim for claim in _CLAIMS})

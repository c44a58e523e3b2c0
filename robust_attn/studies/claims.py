"""What each preset claims against collapse at initialisation, as data: the README's claims table.

The two failure modes, measured on :mod:`robust_attn.studies.stack`'s deep stacks at
initialisation, each layer built exactly as ``create(preset, dim, num_heads)``
builds it, W_q and W_k multiplied by sqk (docs/collapse-setting.md):

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
does. ``benchmarks/claims_table.py`` measures every preset at the depth-24
points of the README's table, over 20 seeds.

The rule. A guarantee is a property: hypothesis requires *every* draw of its
setting (seed included) to keep the bound. The claims table reports
distributions over seeds, and a failure counts in a cell where fewer than
HOLD_SHARE (95 %) of its seeds keep the bound; tests/test_claims_table.py checks
that no preset shows a failure it claims to address in a cell where the
baseline shows it.

Each claim starts from its source's claim and is then measured; where our
measurement disagrees, the claim is narrowed or is 'neither', and ``note``
says what the source claims and what we measured. The bounds are the
thresholds of the stack's verdicts (``robust_attn.studies.stack.ENTROPY_COLLAPSE``,
``RANK_COLLAPSE``), so "addresses" means "the verdict stays healthy".
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from ..claim import (
    BASELINE_ENTROPY_COLLAPSE,
    EITHER_STACK,
    ENTROPY,
    ENTROPY_COLLAPSE,
    NO_ENTROPY_COLLAPSE,
    OUTLIER_REMOVAL_KEEPS_RANK,
    RANK,
    RANK_COLLAPSE,
    ROBUST_KEEPS_RANK,
    Claim,
    Guarantee,
    Setting,
    witness_at,
    witnesses_at,
)
from ..mitigations import MITIGATIONS


def describe_setting(setting: Setting) -> str:
    """``setting`` in words, as the claims table shows it."""
    stacks = {(False,): "attention only", (True,): "with residual"}.get(
        setting.residual, "with or without residual")
    norms = "/".join(f"{norm}-LN" for norm in setting.norms)
    low, high = setting.qk_scales
    head_dims = "/".join(str(width) for width in setting.head_dims)
    return (f"{stacks}, {norms}, sqk {low:g}-{high:g}, depth {setting.depths[0]}-"
            f"{setting.depths[1]}, {setting.tokens[0]}-{setting.tokens[1]} tokens, "
            f"{setting.heads[0]}-{setting.heads[1]} heads of width {head_dims}")


_CLAIMS = (
    Claim(
        "baseline", "Dong et al. 2021; Noci et al. 2022; Zhai et al. 2023",
        "plain softmax attention collapses: in rank without residual connections, in entropy "
        "when the QK logits are large",
        note="The reference. nn.Linear's init gives logits of standard deviation about "
             "sqk^2 / 3. On every draw: rank collapse in attention-only stacks for "
             "sqk <= 1.25 (res < 0.01 from depth 4); entropy collapse for sqk >= 14 (H < 0.1), "
             "with or without residual, pre- or post-LN, 8 to 256 tokens. Residual connections "
             "alone keep res > 0.01.",
        witnesses=witnesses_at("baseline", RANK, ENTROPY),
    ),
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
    Claim(
        "sigma_reparam", "Zhai et al. 2023, ICML (sigmaReparam)",
        "W_hat = gamma W / sigma(W) bounds the logits' spectral scale, so attention entropy "
        "cannot collapse (their Theorem 3.1's lower bound)",
        (NO_ENTROPY_COLLAPSE,),
        note="Where the guarantee comes from: gamma = 1 (the preset, and the paper's "
             "pseudocode), which rescales qkv to unit spectral norm whatever the weights' "
             "scale, so the initial attention no longer depends on sqk (measured worst-layer "
             "H 0.996-0.998). With gamma = sigma(W) (sigma_reparam='preserve', convert's "
             "function-preserving default, and the init of the authors' released ViT code) "
             "W_hat = W: the layer computes what nn.Linear computes, and collapses wherever the "
             "baseline does (tested: H < 0.1 at the entropy witness). The reparametrisation "
             "bounds logit growth in training only through what gamma learns. Not against "
             "rank collapse.",
        witnesses=witnesses_at("sigma_reparam", RANK),
    ),
    Claim(
        "spectral_qk", "this library's method, inspired by Bao, Hataya & Karakida 2024, ICML "
                       "(arXiv 2402.02098)",
        "(the paper) a concentrated QK eigenspectrum (small variance, non-zero mean) "
        "localises attention and can prevent both rank collapse and entropy collapse; its "
        "regulariser LocAteR is not implemented here (we could not read its formula): our "
        "loss and concentrated init are our own derivation",
        note="Measured: neither at initialisation. The init makes M_h = c_h I, so each query "
             "attends to itself: where that dominates (the table's sqk 16) the tokens keep "
             "their rank but the rows are one-hot (H 0.000: entropy collapse); at sqk 1 the "
             "stack collapses in rank as the baseline's does. Our loss is exactly 0 at that "
             "init, so it gives no gradient there: it only pulls a drifting spectrum back "
             "during training.",
        witnesses=witnesses_at("spectral_qk", RANK, ENTROPY),
    ),
    Claim(
        "sink", "Miller 2023; OpenAI 2025 (gpt-oss); Xiao et al. 2024 (StreamingLLM, for the "
                "sink phenomenon)",
        "a sink gives attention somewhere to put unneeded mass; no claim about collapse at "
        "initialisation",
        note="Measured: as the baseline. A sink logit of 0 takes a share 1 / (N + 1) of "
             "near-uniform rows and nothing from rows with large logits.",
        witnesses=witnesses_at("sink", RANK, ENTROPY),
    ),
    Claim(
        "gated", "Qiu et al. 2025 (Gated Attention)",
        "an output gate removes attention sinks and massive activations and stabilises "
        "training; no claim about collapse at initialisation",
        note="Measured: as the baseline. The gate (about 0.5 at initialisation) rescales each "
             "head's output, which neither the attention entropy nor res(X) sees.",
        witnesses=witnesses_at("gated", RANK, ENTROPY),
    ),
    Claim(
        "outlier_removal", "Nait Saada, Naderi & Tanner 2025, ICML (Mind the Gap)",
        "removing the attention matrix's outlier, A - 11^T / N, prevents rank collapse in "
        "depth (and in width)",
        (Guarantee(RANK, OUTLIER_REMOVAL_KEEPS_RANK, RANK_COLLAPSE),),
        note="The preset has no proj bias (as the authors' code): with nn.Linear's default "
             "proj bias, which dominates the small (A - U) V at initialisation, a 24-layer "
             "attention-only stack collapses like the baseline (res ~ 3e-7), and building it "
             "so warns. Measured without the bias: guaranteed in attention-only stacks of depth "
             "4-12 with 4-8 heads and 16-256 tokens (pre- or post-LN) for sqk 0.5-1.25; below "
             "sqk 0.5 the logits are so small that A is nearly U and (A - U) V vanishes within "
             "a few layers (48 of 50 draws fail at sqk 0.25); elsewhere it delays rank "
             "collapse without preventing it. With qk_norm (the robust preset), draws that "
             "fail: 7 of 500 with 1-2 heads and 8-16 tokens at depth 4-16 (one at depth 5), "
             "1 of 60 at depth 24, 5 at 32, 10 at 48 (1-8 heads, 8-64 tokens). res(X) drifts "
             "from layer to layer, and once the tokens are nearly alike, A is nearly U and "
             "(A - U) V, quadratic in the tokens' differences, shrinks faster than the next "
             "LayerNorm (eps 1e-5) can scale it back up, so the output vanishes (X = 0, "
             "res 0). Not against entropy collapse.",
        witnesses=witnesses_at("outlier_removal", ENTROPY),
    ),
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
    Claim(
        "robust", "this library: qk_norm (Henry et al. 2020; Dehghani et al. 2023) with outlier "
                  "removal (Nait Saada, Naderi & Tanner 2025) and no proj bias",
        "bounding the logits (qk_norm) and removing the attention matrix's outlier (A - U) "
        "together avoid both entropy collapse and rank collapse",
        (Guarantee(ENTROPY, Setting(EITHER_STACK, BASELINE_ENTROPY_COLLAPSE.qk_scales,
                                    depths=(4, 48), tokens=(8, 256), heads=(1, 8),
                                    norms=("pre", "post")), ENTROPY_COLLAPSE),
         Guarantee(RANK, ROBUST_KEEPS_RANK, RANK_COLLAPSE)),
        note="Chosen by measurement: qk_norm keeps every layer's entropy (worst-layer H about "
             "0.8-0.9 at any sqk), outlier removal keeps the tokens apart. Both bounds hold on "
             "every draw of ROBUST_HOLDS: with residual connections over the whole range "
             "(depth 4-48, sqk 0.25-32, 8-256 tokens, 1-8 heads, pre- or post-LN), and in "
             "attention-only stacks of depth 4-12 with 4-8 heads and 16-256 tokens. Beyond "
             "that without residual connections, outlier removal only delays rank collapse "
             "(about 1 draw in 70 with 1-2 heads and 8-16 tokens up to depth 16, 1 in 6 at "
             "depth 48; outlier_removal's note says why); the entropy bound holds everywhere.",
    ),
    Claim(
        "block_sparse", "Parmar et al. 2018; Qiu et al. 2020; Beltagy et al. 2020; Zaheer et al. "
                        "2020",
        "local blocks plus global tokens cut attention's cost to linear in N; no claim about "
        "collapse at initialisation",
        note="Measured: neither. Up to 64 tokens (one block) it is dense attention: as the "
             "baseline. With several full blocks, tokens of different blocks mix only through "
             "the global token, so each block collapses to its own mean and res(X) can stay "
             "up: a partition, not a cure; a small last block still collapses with the rest.",
        witnesses=witnesses_at("block_sparse", RANK, ENTROPY),
    ),
    Claim(
        "strided", "Child et al. 2019 (Sparse Transformers)",
        "the strided pattern cuts attention's cost to N^2 / 8 scores; no claim about collapse "
        "at initialisation",
        note="Measured: neither as a guarantee. Query i sees only keys j = i mod 8, so the 8 "
             "residue classes never mix and each collapses to its own mean (rank <= 8, not 1): "
             "at the table's width (128) res(X) stays about 0.7 in attention-only stacks. But "
             "every token then passes through the same per-layer linear map V W_o, whose product "
             "over depth aligns the class means in narrow models: with one head of width 8 and "
             "16 tokens, res(X) falls below 0.01 by depth 8 (the rank witness). A partition, "
             "not a cure. Not against entropy collapse (rows of N / 8 keys still go one-hot; "
             "rows of one key count as H = 1).",
        witnesses={RANK: witness_at("strided", RANK, depth=8, dim=8, num_heads=1, tokens=16,
                                  seed=6),
                   ENTROPY: witness_at("strided", ENTROPY)},
    ),
)

def _gathered() -> dict[str, Claim]:
    """The claims above and those the mitigations own (``Mitigation.claims``), by preset."""
    claims = {claim.variant: claim for claim in _CLAIMS}
    for mitigation in MITIGATIONS.values():
        for claim in mitigation.claims:
            if claim.variant in claims:
                raise ValueError(f"preset {claim.variant!r} has two claims ({mitigation.__name__})")
            claims[claim.variant] = claim
    return claims


CLAIMS: Mapping[str, Claim] = MappingProxyType(_gathered())

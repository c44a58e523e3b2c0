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
    ENTROPY,
    RANK,
    Claim,
    Setting,
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

"""What a claim is, as data: the failures, their bounds, the setting a guarantee covers.

Core data, read by the mitigations that own their claims (``Mitigation.claims``),
by :mod:`robust_attn.studies.claims` (which gathers them, with the baseline's)
and by the studies that measure them (:mod:`robust_attn.studies.stack`). No
torch here: a mitigation's file can state its claim without importing the
harness. The rules and the measurement are described in
:mod:`robust_attn.studies.claims` and docs/collapse-setting.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace

# The stack's verdict thresholds: entropy collapse where the worst layer's mean normalised
# attention entropy H < ENTROPY_COLLAPSE, rank collapse where the output's res(X) < RANK_COLLAPSE.
ENTROPY_COLLAPSE = 0.1
RANK_COLLAPSE = 0.01


@dataclass(frozen=True)
class StackSetting:
    """One measurement: a variant's stack at one weight scale, drawn from one seed."""

    variant: str = "baseline"
    depth: int = 24
    dim: int = 128
    num_heads: int = 4
    tokens: int = 64
    batch: int = 2
    qk_scale: float = 1.0
    residual: bool = False
    norm: str = "pre"
    seed: int = 0



HOLD_SHARE = 0.95
ENTROPY = "entropy collapse"
RANK = "rank collapse"
ATTENTION_ONLY = (False,)
EITHER_STACK = (False, True)


@dataclass(frozen=True)
class Setting:
    """Stacks at initialisation: residual connections and LayerNorm positions (each value
    listed is drawn), closed ranges of the QK weight scale sqk, the depth, the number of tokens
    and of heads, and the head widths drawn (model width = heads x head width).

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
    norms: tuple[str, ...] = ("pre",)


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
BASELINE_ENTROPY_COLLAPSE = Setting(residual=EITHER_STACK, qk_scales=(14.0, 32.0))
BASELINE_RANK_COLLAPSE = Setting(residual=ATTENTION_ONLY, qk_scales=(0.25, 1.25))

# Where outlier removal (no proj bias) with qk_norm keeps res(X) >= 0.01 on every draw (measured,
# and found by the thorough profile: narrower, shorter or deeper attention-only stacks sometimes
# drift into alike tokens; see the outlier_removal claim's note). qk_norm makes sqk irrelevant.
ROBUST_KEEPS_RANK = Setting(ATTENTION_ONLY, BASELINE_RANK_COLLAPSE.qk_scales, depths=(4, 12),
                            tokens=(16, 256), heads=(4, 8), norms=("pre", "post"))
# Outlier removal alone also needs logits that are not nearly zero (sqk >= 0.5: see its note).
OUTLIER_REMOVAL_KEEPS_RANK = replace(ROBUST_KEEPS_RANK, qk_scales=(0.5, 1.25))

NO_ENTROPY_COLLAPSE = Guarantee(ENTROPY, BASELINE_ENTROPY_COLLAPSE, ENTROPY_COLLAPSE)


# Where the robust preset keeps both bounds on every draw (tests/test_collapse_claims.py).
ROBUST_HOLDS = (
    Setting((True,), (0.25, 32.0), depths=(4, 48), tokens=(8, 256), heads=(1, 8),
            norms=("pre", "post")),
    Setting(ATTENTION_ONLY, (0.25, 32.0), depths=(4, 12), tokens=(16, 256), heads=(4, 8),
            norms=("pre", "post")),
)


def witness_at(variant: str, failure: str, **changes) -> StackSetting:
    """The table's point for ``failure`` (rank: sqk 1, attention only; entropy: sqk 16, with
    residual) at depth 24, width 64, 4 heads, 32 tokens, batch 1, seed 0, with ``changes``."""
    point = {RANK: {"qk_scale": 1.0, "residual": False},
             ENTROPY: {"qk_scale": 16.0, "residual": True}}[failure]
    return StackSetting(**{"variant": variant, "depth": 24, "dim": 64, "num_heads": 4,
                           "tokens": 32, "batch": 1, **point, **changes})


def witnesses_at(variant: str, *failures: str) -> dict[str, StackSetting]:
    return {failure: witness_at(variant, failure) for failure in failures}



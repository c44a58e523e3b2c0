"""Sparse attention: restrict each query to the keys a pattern allows.

    s_ij = -inf  where the pattern blocks (i, j)            (robust_attn.sparse)

Sparsity is a cost measure more than a cure: it bounds how many keys a query
can spread over, and block-local or windowed patterns make attention linear
in N. Patterns and their sources: :mod:`robust_attn.sparse` (Child et al.
2019, Sparse Transformers; Beltagy et al. 2020, Longformer; Zaheer et al.
2020, Big Bird; Ho et al. 2019, Axial Attention).

The pattern travels to the kernels on the AttentionProblem (its ``pattern``
field), so every kernel either honours it or refuses; auto picks a structured
sparse kernel where one applies (see :mod:`robust_attn.kernels`). It is
attached at the key/value-extras stage, the stage that hands mitigations the
problem: keys prepended there by other mitigations stay visible to every
query, whichever runs first. The health probe measures entropy and sparsity
over the allowed keys, and counts queries left with no key (``empty_queries``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..claim import ENTROPY, RANK, Claim, witness_at, witnesses_at
from ..config import AttentionConfig
from ..problem import AttentionProblem
from ..sparse import BlockLocal, GlobalTokens, Pattern, Strided
from .base import Mitigation

if TYPE_CHECKING:
    from ..call import AttentionCall


class Sparsity(Mitigation):
    option = "sparsity"
    claims = (
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
    presets = {
        # Blocks of 64 tokens (Parmar et al. 2018; Qiu et al. 2020) plus the first token (a ViT's
        # class token) global (Longformer, Big Bird): the block_sparse kernel, linear in N.
        "block_sparse": {"sparsity": BlockLocal(64) | GlobalTokens(1)},
        # Child et al. 2019's strided pattern, (i - j) mod 8 == 0 (the paper pairs it with a local
        # window in other layers): the strided kernel, N^2 / 8 scores.
        "strided": {"sparsity": Strided(8)},
    }

    def __init__(self, pattern: Pattern):
        super().__init__()
        self.pattern = pattern

    @classmethod
    def from_option(cls, value: Any, config: AttentionConfig) -> Sparsity | None:
        if value is None or value is False:
            return None
        if not isinstance(value, Pattern):
            raise ValueError(f"sparsity={value!r}: expected a robust_attn.sparse pattern such "
                             "as SlidingWindow(128) | GlobalTokens(1), or None")
        return cls(value)

    def saved_value(self) -> str:
        return repr(self.pattern)

    def extend_keys(self, problem: AttentionProblem, call: AttentionCall) -> AttentionProblem:
        pattern = self.pattern if problem.pattern is None else problem.pattern & self.pattern
        return problem.with_(pattern=pattern)

    def extra_repr(self) -> str:
        return f"pattern={self.pattern}"

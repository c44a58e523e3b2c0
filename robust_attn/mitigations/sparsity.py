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

from ..config import AttentionConfig
from ..problem import AttentionProblem
from ..sparse import BlockLocal, GlobalTokens, Pattern, Strided
from .base import Mitigation

if TYPE_CHECKING:
    from ..call import AttentionCall


class Sparsity(Mitigation):
    option = "sparsity"
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

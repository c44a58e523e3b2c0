"""Hypothesis strategies for attention tests, as reusable values (see hypothesis' docs on composing).

    from hypothesis import given
    from robust_attn.testing import strategies as ras

    @given(ras.attention_shapes(), ras.seeds)
    def test_my_layer(shape, seed): ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

seeds = st.integers(min_value=0, max_value=2**31 - 1)


@dataclass(frozen=True)
class AttentionShape:
    """(B, N, C) tokens split into H heads of width C // H."""

    batch: int
    tokens: int
    heads: int
    head_dim: int

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


@st.composite
def attention_shapes(draw, max_batch: int = 3, max_tokens: int = 33, max_heads: int = 4,
                     head_dims=(1, 3, 8, 12, 16)) -> AttentionShape:
    """Small shapes, including N = 1, one head, and head widths that are not powers of two."""
    return AttentionShape(
        batch=draw(st.integers(1, max_batch)),
        tokens=draw(st.integers(1, max_tokens)),
        heads=draw(st.integers(1, max_heads)),
        head_dim=draw(st.sampled_from(head_dims)),
    )


MASK_KINDS = ("none", "bool", "float")


@st.composite
def attention_masks(draw, shape: AttentionShape, kinds=MASK_KINDS, allow_empty_rows: bool = True,
                    num_keys: int | None = None):
    """None, a bool mask (True = may attend) or an additive float mask with -inf entries, in a
    shape broadcastable to (B, H, N, Nk): (N, Nk), (1, 1, N, Nk), (B, 1, N, Nk) or (B, H, N, Nk).
    Nk is ``num_keys`` (default N). With ``allow_empty_rows``, some query rows may have no
    allowed key at all."""
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return None
    b, h, n, nk = shape.batch, shape.heads, shape.tokens, num_keys or shape.tokens
    mask_shape = draw(st.sampled_from([(n, nk), (1, 1, n, nk), (b, 1, n, nk), (b, h, n, nk)]))
    generator = torch.Generator().manual_seed(draw(seeds))
    allowed = torch.rand(mask_shape, generator=generator) < draw(st.floats(0.3, 1.0))
    if not allow_empty_rows:
        allowed[..., 0] = True
    if kind == "bool":
        return allowed
    bias = torch.randn(mask_shape, generator=generator)
    return bias.masked_fill(~allowed, -torch.inf)

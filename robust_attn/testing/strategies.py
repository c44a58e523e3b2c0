"""Hypothesis strategies for attention tests, as reusable values (see hypothesis' docs on
composing).

    from hypothesis import given
    from . import strategies as ras

    @given(ras.attention_shapes(), ras.seeds)
    def test_my_layer(shape, seed): ...
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from hypothesis import strategies as st

from ..claim import StackSetting

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
                     head_dims=(1, 3, 8, 12, 16), tokens=None,
                     variant: str | None = None) -> AttentionShape:
    """Small shapes, including N = 1, one head, and head widths that are not powers of two.
    ``tokens``: a strategy for N replacing the default, integers in [1, max_tokens].
    ``variant``: only the head widths that preset accepts (``presets.head_dim_multiple``)."""
    if variant is not None:
        from ..presets import head_dim_multiple

        head_dims = [width for width in head_dims if width % head_dim_multiple(variant) == 0]
    return AttentionShape(
        batch=draw(st.integers(1, max_batch)),
        tokens=draw(st.integers(1, max_tokens) if tokens is None else tokens),
        heads=draw(st.integers(1, max_heads)),
        head_dim=draw(st.sampled_from(head_dims)),
    )


MASK_KINDS = ("none", "bool", "float")
# Where a float mask blocks a key: -inf, or the dtype's most negative finite value as Hugging Face
# models build their masks (finfo.min), with which a fully masked row is uniform, not zero.
MASK_FILLS = ("-inf", "finfo.min")


def mask_shapes(shape: AttentionShape, num_keys: int | None = None):
    """Every shape that broadcasts to (B, H, N, Nk): per query or per key only (key padding),
    with or without batch and head dimensions, 2D to 4D."""
    b, h, n, nk = shape.batch, shape.heads, shape.tokens, num_keys or shape.tokens
    return st.sampled_from([(n, nk), (1, nk), (h, n, nk), (1, 1, n, nk), (b, 1, n, nk),
                            (b, 1, 1, nk), (1, h, n, nk), (b, h, n, nk)])


@st.composite
def attention_masks(draw, shape: AttentionShape, kinds=MASK_KINDS, allow_empty_rows: bool = True,
                    num_keys: int | None = None, fills=("-inf",), contiguous: bool | None = True):
    """None, a bool mask (True = may attend) or an additive float mask, in a shape broadcastable
    to (B, H, N, Nk) (:func:`mask_shapes`). Nk is ``num_keys`` (default N). A float mask blocks
    a key with a value drawn from ``fills`` (:data:`MASK_FILLS`). With ``allow_empty_rows``,
    some query rows may have no allowed key at all (sometimes forced: a whole row blocked);
    else every row allows its first key. ``contiguous``: True, False (the same values in a
    non-contiguous tensor, :func:`non_contiguous`) or None (drawn)."""
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return None
    mask_shape = draw(mask_shapes(shape, num_keys))
    generator = torch.Generator().manual_seed(draw(seeds))
    allowed = torch.rand(mask_shape, generator=generator) < draw(st.floats(0.3, 1.0))
    if not allow_empty_rows:
        allowed[..., 0] = True
    elif draw(st.booleans()):
        allowed[..., draw(st.integers(0, mask_shape[-2] - 1)), :] = False
    if kind == "bool":
        mask = allowed
    else:
        fill = -math.inf if draw(st.sampled_from(fills)) == "-inf" else torch.finfo().min
        mask = torch.randn(mask_shape, generator=generator).masked_fill(~allowed, fill)
    if contiguous is None:
        contiguous = draw(st.booleans())
    return mask if contiguous else non_contiguous(mask)


def non_contiguous(tensor: torch.Tensor) -> torch.Tensor:
    """The same values in a non-contiguous tensor: every other element of a tensor twice as long
    in its last dim (a stride of 2)."""
    return torch.stack((tensor, tensor), dim=-1)[..., 0]


def input_scales(min_exponent: float = -30.0, max_exponent: float = 30.0):
    """A scale 10^e, e uniform in [min_exponent, max_exponent] (log-uniform scales)."""
    if not min_exponent <= max_exponent:
        raise ValueError(f"input_scales({min_exponent}, {max_exponent}): "
                         f"expected min_exponent <= max_exponent")
    return st.floats(min_exponent, max_exponent).map(lambda exponent: 10.0 ** exponent)


# Memory layouts of a (B, N, C) token tensor:
#   contiguous        the usual layout
#   transposed        stored as (B, C, N) and transposed: also what x.flatten(2).mT gives for a
#                     (B, C, H, W) feature map in the default (NCHW) memory format
#   channels_last     the (B, H*W, C) view x.flatten(2).mT of a (B, C, H, W) feature map in
#                     channels_last memory
#   strided           every other element of a (B, N, 2C) tensor: a stride of 2 in the last dim
INPUT_LAYOUTS = ("contiguous", "transposed", "channels_last", "strided")


def in_layout(values: torch.Tensor, layout: str, height: int = 1) -> torch.Tensor:
    """(B, N, C) ``values`` copied into a tensor of the given layout (:data:`INPUT_LAYOUTS`);
    ``height`` is the feature map's H (it must divide N)."""
    b, n, c = values.shape
    if layout == "contiguous":
        return values.contiguous()
    if layout == "transposed":
        return values.mT.contiguous().mT
    if layout == "channels_last":
        if n % height:
            raise ValueError(f"height={height} does not divide the {n} tokens")
        feature_map = torch.empty(b, c, height, n // height, dtype=values.dtype,
                                  device=values.device).to(memory_format=torch.channels_last)
        tokens = feature_map.flatten(2).mT  # a view: (B, H*W, C)
        tokens.copy_(values)
        return tokens
    if layout == "strided":
        wide = values.new_zeros(b, n, 2 * c)
        wide[..., ::2] = values
        return wide[..., ::2]
    raise ValueError(f"layout={layout!r} is not one of {INPUT_LAYOUTS}")


unit_scale = st.just(1.0)
input_layouts = st.sampled_from(INPUT_LAYOUTS)


@st.composite
def token_inputs(draw, shape: AttentionShape, scales=unit_scale, layouts=input_layouts,
                 dtype: torch.dtype = torch.float32):
    """(B, N, C) inputs with N(0, scale^2) entries, scale drawn from ``scales`` (e.g.
    :func:`input_scales`), in a memory layout drawn from ``layouts`` (:data:`INPUT_LAYOUTS`)."""
    generator = torch.Generator().manual_seed(draw(seeds))
    values = torch.randn(shape.batch, shape.tokens, shape.dim, generator=generator,
                         dtype=torch.float64) * draw(scales)
    layout = draw(layouts)
    divisors = [h for h in range(1, shape.tokens + 1) if shape.tokens % h == 0]
    return in_layout(values.to(dtype), layout, draw(st.sampled_from(divisors)))


# The collapse setting: deep stacks of attention at initialisation (robust_attn.studies.stack).
#
#     from hypothesis import given
#     from robust_attn.studies.stack import measure_stack
#     from robust_attn.testing import assert_no_entropy_collapse, strategies as ras
#
#     @given(ras.stack_settings("qk_norm", qk_scales=ras.qk_scales(6, 32)))
#     def test_qk_norm_keeps_entropy(setting):
#         assert_no_entropy_collapse(measure_stack(setting))
#
# A model of your own: draw its sizes and input from the same parts, and check
# it with the assertions (robust_attn.testing.assertions), e.g. an encoder whose
# forward returns its (B, N, C) tokens:
#
#     @given(ras.stack_heads, ras.stack_head_dims, ras.stack_tokens, ras.seeds)
#     def test_my_encoder_has_not_collapsed_at_init(heads, head_dim, tokens, seed):
#         torch.manual_seed(seed)
#         encoder = MyEncoder(depth=12, dim=heads * head_dim, num_heads=heads,
#                             attn_layer=partial(robust_attn.create, "outlier_removal"))
#         x = torch.randn(2, tokens, heads * head_dim)
#         assert_no_entropy_collapse(encoder, x)
#         assert_no_rank_collapse(encoder, x)

QK_SCALES = (0.5, 32.0)


def qk_scales(min_value: float = QK_SCALES[0], max_value: float = QK_SCALES[1]):
    """The factor s on the std of W_q and W_k, log-uniform over [min_value, max_value].

    The attention logits scale as s^2 (robust_attn.studies.stack), so collapse depends
    on log s: a log-uniform draw spends as many examples on [0.5, 4] as on [4, 32].
    """
    if not 0 < min_value <= max_value:
        raise ValueError(f"qk_scales({min_value}, {max_value}): "
                         f"expected 0 < min_value <= max_value")
    return st.floats(math.log(min_value), math.log(max_value)).map(
        lambda log_scale: min(max(math.exp(log_scale), min_value), max_value))


# The parts of a stack setting, each a strategy to reuse or replace.
stack_depths = st.integers(8, 48)
stack_heads = st.integers(1, 4)
stack_head_dims = st.sampled_from((8, 12, 16))
stack_tokens = st.integers(4, 32)
stack_batches = st.integers(1, 2)
stack_qk_scales = qk_scales()
stack_residual = st.booleans()
stack_norms = st.just("pre")


@st.composite
def stack_settings(draw, variant: str = "baseline", *, depths=stack_depths, heads=stack_heads,
                   head_dims=stack_head_dims, tokens=stack_tokens, batches=stack_batches,
                   qk_scales=stack_qk_scales, residual=stack_residual, norms=stack_norms,
                   seeds=seeds) -> StackSetting:
    """A :class:`robust_attn.studies.stack.StackSetting` of ``variant``: depth in [8, 48], width
    heads x head_dim <= 64, 4 to 32 tokens, batch 1 or 2, an initial QK scale in [0.5, 32],
    with or without residual connections, pre-LN (``norms``: "pre" or "post"). Each keyword
    is a strategy that replaces a part.

    The defaults keep a depth-48 stack under a second on a CPU; measure a
    setting with :func:`robust_attn.studies.stack.measure_stack`.
    """
    num_heads = draw(heads)
    return StackSetting(variant=variant, depth=draw(depths), dim=num_heads * draw(head_dims),
                        num_heads=num_heads, tokens=draw(tokens), batch=draw(batches),
                        qk_scale=draw(qk_scales), residual=draw(residual), norm=draw(norms),
                        seed=draw(seeds))

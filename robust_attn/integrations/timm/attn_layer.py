"""``layer(variant, **options)``: a RobustAttention class for timm's ``attn_layer=`` argument.

    model = timm.create_model("vit_small_patch16_224",
                              attn_layer=robust_attn.layer("sigma_reparam"))

timm builds each block's attention as ``attn_layer(dim, num_heads=..., qkv_bias=...,
qk_norm=..., ...)`` and checks ``issubclass(attn_layer, DiffAttention)``
(timm/models/vision_transformer.py, ``_create_attn``), so it needs a class, not
a partial. ``layer`` makes one RobustAttention subclass per (variant, options),
caches it, and registers its metaclass with :mod:`copyreg` so that the class and
its instances pickle by (variant, options) and unpickle in any process.

The class applies the preset's options, then ``options``, then timm's
arguments; ``qk_norm`` is on when either the preset or timm asks for it (timm
always passes ``qk_norm=False`` unless the model config sets it), and the proj
bias is off when either turns it off (timm passes ``proj_bias=True`` by default,
which would defeat outlier removal's claim at initialisation). Options are
used as given: the layer builds fresh modules, so ``sigma_reparam=True`` starts
gamma = 1 as in the paper. To keep pretrained weights use
:func:`robust_attn.convert`, which uses function-preserving initialisations.
"""

from __future__ import annotations

import copyreg
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar

from ...attention import RobustAttention
from ...presets import preset_options
from .fx import register_fx_leaf

_LayerKey = tuple[str, tuple[tuple[str, Any], ...]]


class PresetAttention(RobustAttention):
    """Base of the classes ``layer`` makes: RobustAttention with a variant's options built in."""

    layer_variant: ClassVar[str] = "baseline"
    layer_options: ClassVar[Mapping[str, Any]] = MappingProxyType({})
    layer_key_options: ClassVar[tuple[tuple[str, Any], ...]] = ()

    def __init__(self, dim: int, num_heads: int = 8, **kwargs: Any) -> None:
        options = dict(self.layer_options)
        qk_norm = (options.pop("qk_norm", False), kwargs.pop("qk_norm", False))
        proj_bias = (options.pop("proj_bias", True), kwargs.pop("proj_bias", True))
        super().__init__(dim, num_heads, qk_norm=any(qk_norm), proj_bias=all(proj_bias),
                         **{**options, **kwargs})


class _LayerClass(type):
    """Metaclass of the classes ``layer`` makes; copyreg pickles them by their cache key."""


_CLASSES: dict[_LayerKey, type[PresetAttention]] = {}


def _layer_from_key(variant: str, options: tuple[tuple[str, Any], ...]) -> type[PresetAttention]:
    return layer(variant, **dict(options))


copyreg.pickle(_LayerClass, lambda cls: (_layer_from_key, (cls.layer_variant,
                                                            cls.layer_key_options)))


def layer(variant: str, **options: Any) -> type[PresetAttention]:
    """The RobustAttention subclass for ``variant`` with ``options`` (one class per arguments).

    Option values must be hashable (they key the cache), e.g. ``layer("softcap", softcap=30.0)``.
    """
    register_fx_leaf()
    key_options = tuple(sorted(options.items()))
    key = (variant, key_options)
    try:
        cached = _CLASSES.get(key)
    except TypeError:
        raise TypeError(f"layer({variant!r}, ...): option values must be hashable, got "
                        f"{options!r}") from None
    if cached is None:
        merged = {**preset_options(variant), **options}
        name = "RobustAttention_" + re.sub(r"\W", "_", variant)
        cached = _LayerClass(name, (PresetAttention,), {
            "__module__": __name__,
            "__doc__": f"RobustAttention with variant {variant!r}: options {merged!r}.",
            "layer_variant": variant,
            "layer_options": MappingProxyType(merged),
            "layer_key_options": key_options,
        })
        _CLASSES[key] = cached
    return cached

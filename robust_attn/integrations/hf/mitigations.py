"""The mitigations of one Hugging Face attention module, attached to it as ``module.robust_attn``.

transformers' attention modules project q, k, v, apply the model's RoPE and cache,
then call the attention function ``config._attn_implementation`` names. The
"robust_attn" function (:mod:`.function`) reads this container from the module
it is given and runs RobustAttention's stages on it: q/k transforms
(scalable-softmax), key extras (sinks, sparsity), score modifiers (softcap, ALiBi),
the normalizer (sigmoid), the kernel, output transforms (outlier removal), the
probe and the observers. It is an ``nn.Module`` child of the HF module, so its
parameters (a sink logit per head, scalable-softmax's s, the gate's layer; the gate reads
the module's input, :mod:`.inputs`) train, save and load
with the model's.

It answers what the monitor and ``robust_attn.recording`` ask of an attention
module (``register_observer``, ``num_heads``, ``mitigations``, ``probe``,
``health``): those methods are RobustAttention's own, not copies. Nothing per
call is stored on it; the one attribute a forward writes is ``health``, and only
while the probe is on (as for RobustAttention).

Mitigations that build or replace the module's own layers (sigma_reparam,
qk_norm, spectral_qk, qk_clip), rotate q and k (rope: the model applies its
own) or split the heads (differential) cannot live here; :data:`UNSUPPORTED` says
why for each. sigma_reparam is applied to the HF projections by
:func:`robust_attn.integrations.hf.convert` instead.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from torch import nn

from ...attention import RobustAttention, _build_mitigations
from ...call import ObserverEntry
from ...config import AttentionConfig
from ...health import probe as health_probe
from ...kernels import check_kernel_name

# Option -> why the HF attention function cannot run it.
UNSUPPORTED = {
    "sigma_reparam": "it reparametrises the projections; convert applies it to the HF module's "
                     "q/k/v/o layers instead",
    "qk_norm": "it builds q/k norm layers that must run before the model's RoPE, inside the HF "
               "module's forward, which the attention function does not reach",
    "spectral_qk": "it builds the module's qkv layer",
    "qk_clip": "it builds and rescales the module's qkv layer",
    "rope": "the HF model applies its own rotary embedding before the attention function",
    "differential": "it needs the module's projections split into two maps per head",
}


class HFAttentionMitigations(nn.Module):
    """Score-level mitigations, kernel choice and probe settings of one HF attention module.

    Args:
        options: mitigation options (e.g. ``{"softcap": 30.0}``); each must be runnable by the
            attention function (not in :data:`UNSUPPORTED`).
        config: the module's shape (heads, head width, biases), for building the mitigations.
        host: the HF attention module this container is attached to (a plain attribute, not
            a submodule: its query projection is what :attr:`qkv` gives the monitor).
        kernel, probe, probe_queries, probe_spectral: as RobustAttention's.
        source_implementation: the model's attention implementation before convert, which
            revert restores.

    ``input_hooks``: the handles of the hooks convert registers on the host (:mod:`.inputs`),
    which revert removes.
    """

    # RobustAttention's own methods, on the same attributes (module docstring).
    register_observer = RobustAttention.register_observer
    normalises_qk = RobustAttention.normalises_qk
    probe_active = RobustAttention.probe_active
    _score_mods = RobustAttention._score_mods
    _normalizer = RobustAttention._normalizer
    _attend = RobustAttention._attend
    _measure = RobustAttention._measure
    _mitigation_health = RobustAttention._mitigation_health

    def __init__(self, options: dict[str, Any], config: AttentionConfig, host: nn.Module, *,
                 kernel: str = "auto", probe: bool | None = None,
                 probe_queries: int = health_probe.DEFAULT_MAX_QUERIES,
                 probe_spectral: bool = False, source_implementation: str = "sdpa") -> None:
        super().__init__()
        if refused := {name: UNSUPPORTED[name] for name, value in options.items()
                       if name in UNSUPPORTED and value not in (None, False)}:
            raise ValueError(f"the Hugging Face attention function cannot run {refused}")
        self.mitigations = nn.ModuleDict(_build_mitigations(options, config))
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.kernel = check_kernel_name(kernel)
        self.probe = probe
        if isinstance(probe_queries, bool) or not isinstance(probe_queries, int) or probe_queries < 1:
            raise ValueError(f"probe_queries={probe_queries!r}: expected a positive integer")
        self.probe_queries = probe_queries
        self.probe_spectral = probe_spectral
        self.health: health_probe.AttentionHealth | None = None
        self.source_implementation = source_implementation
        self.input_hooks: tuple = ()
        self._observers: OrderedDict[int, ObserverEntry] = OrderedDict()
        object.__setattr__(self, "_host", host)  # not registered: the host owns this module

    def layers_by_role(self) -> dict[str, nn.Module]:
        """Empty: the projections are the model's (the options that act on qkv's weights,
        qk_clip and spectral_qk, are refused here)."""
        return {}

    @property
    def host(self) -> nn.Module:
        """The HF attention module this container is attached to (the monitor's gradient norm
        covers its parameters: the projections and this container's)."""
        return self._host

    @property
    def qkv(self) -> nn.Module:
        """The host module's query (or fused qkv) projection: what code written for
        RobustAttention reads ``qkv`` for (the monitor: the weights' device)."""
        host = self._host
        for name in ("q_proj", "query", "c_attn"):
            if (layer := getattr(host, name, None)) is not None:
                return layer
        raise AttributeError(f"{type(host).__name__} has no q_proj, query or c_attn projection")

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, kernel={self.kernel!r}"

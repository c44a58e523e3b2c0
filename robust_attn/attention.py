"""RobustAttention: timm's multi-head self-attention with a pipeline of mitigations.

With no mitigation it computes exactly what ``timm.layers.Attention`` computes
(same constructor, forward, parameter names and attributes), so a timm state
dict loads with ``strict=True``. Mitigations are keyword options, each built by
its own class in :mod:`robust_attn.mitigations` and run at its stage:

    x -> qkv -> split heads -> q_norm/k_norm, q/k transforms -> key/value extras
      -> scores (score_mod, normalizer) -> kernel -> output transforms
      -> merge heads -> norm -> proj

Masks: ``attn_mask`` is bool (True = may attend) or additive float, of any
shape that broadcasts to (B, H, N, N), 0-D to 4-D (a key padding mask (N,) or
(B, 1, 1, N), a per-head (H, N, N), ...); forward views it as 4-D once, so
kernels and mitigations always see (B or 1, H or 1, N or 1, N), and casts a float
mask to q's dtype (a float32 mask works with a float16 or bfloat16 module). ``is_causal``
and ``attn_mask`` together are combined (both apply); timm's own Attention
raises (fused) or ignores the mask (unfused) in that case.

Overflow: before the kernel runs, forward refuses a finite x whose logits overflow
(:mod:`robust_attn.logit_limit`): where scale * max ||q_i|| * max ||k_j|| exceeds
1e8 (2**15 for float16 logits), or a row of q or k before qk_norm has a norm above
2**60, a RuntimeError whose message starts with "x:" says so and what to do. It
bounds the tokens' own q and k, before mitigations add keys (sink keys and logits are
weights, not inputs: a sink logit of -inf, no sink, is allowed). The
check is ``torch._assert_async`` (no host synchronisation, compiles with
fullgraph=True); an x holding nan or inf passes, for the probe and the guard to report.

Checkpoints: a state dict that holds a module's weights but none of a
mitigation's state (saved before the mitigation was added, e.g. from timm or
the baseline) fails a strict load with a message naming the mitigation;
:func:`load_upgrading` loads it explicitly, keeping the mitigation's fresh state.
A state dict that also holds keys the module lacks was saved with other options:
the message says so instead (load_upgrading cannot bridge it).

Option values: ``state_dict()`` records each mitigation's value in the state dict's
metadata (``state_dict._metadata[prefix]["robust_attn_options"]``, kept by torch.save
and ``torch.load(weights_only=True)``): what the value changes beyond the tensors
(:meth:`Mitigation.saved_value`: softcap's cap, sigmoid's bias, the sparsity pattern,
RoPE's layout, the gate mode, a learned or fixed sink logit). Loading (strict or not,
and :func:`load_upgrading`) refuses a state dict whose recorded value of an option
differs from the module's, naming the option and both values. Only options that
both have are compared: adding or removing a stateless option (softcap on a baseline
checkpoint, a softcap module's weights copied into a plain one) is allowed, and
stateful ones show in the keys. A state dict without the record (timm's, a plain
``dict`` copy) loads as before. To change an option's value on purpose, load
``dict(state_dict)``, which drops the metadata.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Final

import torch
from einops import rearrange
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from ._compat import refuse_torchscript
from .call import Attended, AttentionCall, AttentionRecord, Observer, ObserverEntry
from .config import AttentionConfig
from .health import probe as health_probe
from .kernels import check_kernel_name
from .logit_limit import (
    projected_row_norm_bounds,
    refuse_overflowing_logits,
    refuse_overflowing_norm_input,
    row_norm_bounds,
)
from .mitigations import MITIGATIONS, Mitigation
from .mitigations.base import LayerSpec
from .problem import SOFTMAX, AttentionProblem


def _build_mitigations(options: dict[str, Any], config: AttentionConfig) -> dict[str, Mitigation]:
    unknown = sorted(set(options) - set(MITIGATIONS))
    if unknown:
        raise TypeError(f"RobustAttention got unknown option(s) {unknown}; "
                        f"known mitigation options: {sorted(MITIGATIONS)}")
    built = {name: MITIGATIONS[name].from_option(value, config) for name, value in options.items()}
    built = {name: mitigation for name, mitigation in built.items() if mitigation is not None}
    for name, mitigation in built.items():
        for other, reason in type(mitigation).conflicts.items():
            if other in built:
                raise ValueError(f"options {name!r} and {other!r} conflict: {reason}")
    for stage, default, what in (("normalizer", Mitigation.normalizer, "replaces the softmax"),
                                 ("attend", Mitigation.attend, "solves the problem its own way")):
        overriding = [name for name, m in built.items() if getattr(type(m), stage) is not default]
        if len(overriding) > 1:
            raise ValueError(f"options {overriding} conflict: each {what}")
    return dict(sorted(built.items(), key=lambda item: item[1].output_order))  # stable


_DEFAULT_LAYERS = {"qkv": "linear", "proj": "linear", "q_norm": "identity", "k_norm": "identity"}


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: expected a positive integer")
    return value


def _check_probability(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name}={value!r}: expected a dropout probability in [0, 1)")
    return float(value)


class RobustAttention(nn.Module):
    """Multi-head self-attention with mitigations against rank and entropy collapse.

    Args (timm's ``Attention``):
        dim: token width C. num_heads: heads H. attn_head_dim: head width D
        (default dim // num_heads). dim_out: output width (default dim).
        qkv_bias, proj_bias: biases of the qkv and proj layers.
        qk_norm: normalise q and k per head with ``norm_layer`` (default LayerNorm).
        scale_norm: normalise the merged attention output with ``norm_layer``.
        attn_drop, proj_drop: dropout on the attention weights and the output.
        device, dtype: factory arguments.
    Args (ours, keyword only):
        kernel: 'auto' (default), 'sdpa', 'flex', 'xformers' or 'eager'; see
            :mod:`robust_attn.kernels`. Setting timm's ``fused_attn = False``
            selects 'eager' as in timm.
        probe: record :class:`~robust_attn.health.probe.AttentionHealth` in ``.health``
            at each forward (None: follow :func:`robust_attn.set_probe_enabled`).
        probe_queries: the probe's bound on sampled query rows per head.
        probe_spectral: the probe also measures the attention matrix's spectral
            gap (an SVD per head: costly, off by default).
        **mitigations: one keyword per mitigation, e.g. ``softcap=50.0``; see
            :data:`robust_attn.mitigations.MITIGATIONS`.
    """

    fused_attn: Final[bool]

    # torch.jit.script refuses the module with this message: its per-call dispatch (observers,
    # the probe switch, the kernel for the device, dtype and mask) is beyond TorchScript, which
    # torch deprecates in favour of torch.compile and torch.export.
    __prepare_scriptable__ = refuse_torchscript(
        "RobustAttention does not support TorchScript (torch.jit.script, deprecated in torch 2.x): "
        "use torch.compile(model) to compile it or torch.export.export(model, args) to export it")

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        attn_head_dim: int | None = None,
        dim_out: int | None = None,
        qkv_bias: bool = False,
        qk_norm: bool = False,
        scale_norm: bool = False,
        proj_bias: bool = True,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        norm_layer: type[nn.Module] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        kernel: str = "auto",
        probe: bool | None = None,
        probe_queries: int = health_probe.DEFAULT_MAX_QUERIES,
        probe_spectral: bool = False,
        **mitigations: Any,
    ) -> None:
        super().__init__()
        _check_positive_int("dim", dim)
        _check_positive_int("num_heads", num_heads)
        if attn_head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}: "
                                 "choose num_heads dividing dim, or pass attn_head_dim")
            attn_head_dim = dim // num_heads
        config = AttentionConfig(
            dim=dim, num_heads=num_heads, head_dim=_check_positive_int("attn_head_dim", attn_head_dim),
            dim_out=_check_positive_int("dim_out", dim_out or dim), qkv_bias=qkv_bias,
            proj_bias=proj_bias, norm_layer=norm_layer or nn.LayerNorm, device=device, dtype=dtype,
        )
        self.config = config
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = config.head_dim
        self.attn_dim = config.attn_dim
        self.scale = config.head_dim ** -0.5
        self.kernel = check_kernel_name(kernel)
        self.fused_attn = kernel != "eager"
        self.probe = probe
        self.probe_queries = _check_positive_int("probe_queries", probe_queries)
        self.probe_spectral = probe_spectral
        self.health: health_probe.AttentionHealth | None = None

        # qk_norm is timm's constructor argument and a mitigation like the others.
        self.mitigations = nn.ModuleDict(_build_mitigations({"qk_norm": qk_norm, **mitigations},
                                                            config))
        for name, mitigation in self.mitigations.items():
            if config.head_dim % mitigation.head_dim_multiple:
                raise ValueError(f"{name} needs a head width that is a multiple of "
                                 f"{mitigation.head_dim_multiple}, got {config.head_dim} "
                                 f"(dim={dim}, num_heads={num_heads}, attn_head_dim)")
        self.layer_builders: dict[str, str] = {}  # role -> the option that built its layer
        head = config.head_dim
        self.qkv = self._layer(LayerSpec("qkv", dim, config.attn_dim * 3, qkv_bias))
        self.q_norm = self._layer(LayerSpec("q_norm", head, head))
        self.k_norm = self._layer(LayerSpec("k_norm", head, head))
        self.attn_drop = nn.Dropout(_check_probability("attn_drop", attn_drop))
        self.norm = config.norm_layer(config.attn_dim, **config.factory_kwargs) if scale_norm \
            else nn.Identity()
        self.proj = self._layer(LayerSpec("proj", config.attn_dim, config.dim_out, proj_bias))
        self.proj_drop = nn.Dropout(_check_probability("proj_drop", proj_drop))
        self._observers: OrderedDict[int, ObserverEntry] = OrderedDict()
        self.initialise_weights()  # e.g. spectral_qk's concentrated spectrum of the new qkv
        self._register_state_dict_hook(_record_options)
        self.register_load_state_dict_post_hook(_explain_absent_state)

    def _layer(self, spec: LayerSpec) -> nn.Module:
        """The layer for ``spec.role``: the one a mitigation builds, else the default."""
        built = {name: layer for name, mitigation in self.mitigations.items()
                 if (layer := mitigation.make_layer(spec, self.config)) is not None}
        if len(built) > 1:
            raise ValueError(f"options {sorted(built)} conflict: each replaces the "
                             f"{spec.role} layer")
        if built:
            (option, layer), = built.items()
            self.layer_builders[spec.role] = option
            return layer
        if _DEFAULT_LAYERS[spec.role] == "identity":
            return nn.Identity()
        return nn.Linear(spec.in_features, spec.out_features, bias=spec.bias,
                         **self.config.factory_kwargs)

    def layers_by_role(self) -> dict[str, nn.Module]:
        """The layers this module holds now, by role: what the mitigations' weight stages act on
        (:data:`robust_attn.mitigations.base.HostLayers`)."""
        return {"qkv": self.qkv, "q_norm": self.q_norm, "k_norm": self.k_norm, "proj": self.proj}

    def register_observer(self, fn: Observer, *, health: bool = False, maps: bool = False,
                          lse: bool = False) -> RemovableHandle:
        """Call ``fn(module, record)`` after every forward with its
        :class:`~robust_attn.call.AttentionRecord`. ``health``: the record carries the probe's
        measurement (computed for this call whatever the probe switch); ``maps``: also the
        sampled attention map; ``lse``: the kernel returns each row's log-sum-exp
        (``record.attended.lse``; auto then picks a kernel that gives it). Returns a handle
        whose ``remove()`` detaches it. Observers are how the monitor and
        :func:`~robust_attn.health.monitor.attention_maps` watch a module: no global state."""
        handle = RemovableHandle(self._observers)
        self._observers[handle.id] = ObserverEntry(fn, health=health, maps=maps, lse=lse)
        return handle

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        return self.attention(x, attn_mask, is_causal)

    def attention(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False,
                  rope: Tensor | None = None) -> Tensor:
        """The forward, with the per-call inputs subclasses add (``rope``: RobustAttentionRope)."""
        self._check_input(x, attn_mask)
        q, k, v = rearrange(self.qkv(x), "b n (qkv h d) -> qkv b h n d", qkv=3, h=self.num_heads)
        observers = tuple(self._observers.values())
        call = AttentionCall(x, _kernel_mask(attn_mask, q.dtype), bool(is_causal), rope,
                             self.kernel if self.fused_attn else "eager",
                             self.attn_drop.p if self.training else 0.0)
        if self.normalises_qk:
            refuse_overflowing_norm_input(
                q, k, x, lambda: projected_row_norm_bounds(x, self.qkv, self.attn_dim))
        q, k = self.q_norm(q), self.k_norm(k)
        normalised = q, k
        for mitigation in self.mitigations.values():
            q, k = mitigation.transform_qk(q, k, call)
        # the tokens' own (sinks are weights); cheap bounds where no stage transformed q and k
        refuse_overflowing_logits(q, k, self.scale, x, self._row_norm_bounds(x) if (
            q is normalised[0] and k is normalised[1]) else None)
        problem = AttentionProblem(q, k, v, self.scale, call.attn_mask, call.is_causal,
                                   self._score_mods(), self._normalizer())
        del q, k, v  # the problem holds them: extend_keys' copies may free the originals
        for mitigation in self.mitigations.values():
            problem = mitigation.extend_keys(problem, call)

        attended = self._attend(problem, call, lse=any(entry.lse for entry in observers))
        for mitigation in self.mitigations.values():  # sorted by output_order at construction
            attended = attended.with_out(mitigation.transform_output(attended, call))
        health, attention_map = self._measure(attended, call, observers)

        x = rearrange(attended.out, "b h n d -> b n (h d)")
        x = self.proj_drop(self.proj(self.norm(x)))
        if observers:
            record = AttentionRecord(call, attended, x, health, attention_map)
            for entry in observers:
                entry.fn(self, record)
        return x

    def _attend(self, problem: AttentionProblem, call: AttentionCall, lse: bool) -> Attended:
        """The attend stage: a mitigation's own way of solving (at most one has one), else the
        kernel; with each row's log-sum-exp when an observer or a mitigation needs it."""
        for mitigation in self.mitigations.values():
            attended = mitigation.attend(problem, call)
            if attended is not None:
                return attended
        lse = lse or any(m.needs_lse for m in self.mitigations.values())
        return call.attend(problem, lse=lse)

    def _measure(self, attended: Attended, call: AttentionCall, observers: tuple[ObserverEntry, ...]):
        """The probe's measurement when the probe is on or an observer asks for it, as
        (health, attention map or None); (None, None) otherwise. Only an active probe writes
        ``self.health``: the one module attribute a forward writes (the documented record)."""
        probe_on = self.probe_active
        keep_map = any(entry.maps for entry in observers)
        if not (probe_on or keep_map or any(entry.health for entry in observers)):
            return None, None
        health, attention_map = health_probe.measure(
            attended.problem, attended.out, self._mitigation_health(call), self.probe_queries,
            self.probe_spectral, keep_map=keep_map)
        if probe_on:
            self.health = health
        return health, attention_map

    def _row_norm_bounds(self, x: Tensor):
        """Cheap bounds of q's and k's row norms (logit_limit.row_norm_bounds), computed lazily."""
        return lambda: row_norm_bounds(x, self.qkv, self.q_norm, self.k_norm, self.attn_dim,
                                       self.head_dim)

    @property
    def normalises_qk(self) -> bool:
        """Whether q and k pass through a normalisation layer (qk_norm)."""
        return "qk_norm" in self.mitigations

    @property
    def probe_active(self) -> bool:
        return health_probe.probe_enabled_everywhere() if self.probe is None else self.probe

    def auxiliary_loss(self) -> Tensor:
        """Sum of the mitigations' auxiliary losses (0 when none has one); add it to the task loss."""
        layers = self.layers_by_role()
        losses = [loss for m in self.mitigations.values()
                  if (loss := m.auxiliary_loss(layers)) is not None]
        return torch.stack(losses).sum() if losses else self.qkv.weight.new_zeros(())

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw every parameter afresh and restart every mitigation's state, as at construction.

        For a module built on the meta device (FSDP's deferred init): ``module.to_empty(device=
        ...)`` allocates uninitialised memory, then ``module.reset_parameters()`` fills it (it
        resets its submodules itself, then applies :meth:`initialise_weights` and
        :meth:`reset_from_weights`, in that order). To load weights instead, call
        ``load_state_dict`` then :meth:`reset_from_weights` (or :func:`load_upgrading`).
        """
        for module in self.modules():
            if module is not self and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()
        self.initialise_weights()
        self.reset_from_weights()

    def initialise_weights(self) -> None:
        """Call after drawing fresh qkv/proj weights in place (a custom init): mitigations that
        shape the initial weights (spectral_qk) apply their initialisation again. Then call
        :meth:`reset_from_weights`."""
        layers = self.layers_by_role()
        for mitigation in self.mitigations.values():
            mitigation.initialise_weights(layers)

    def reset_from_weights(self) -> None:
        """Call after replacing qkv/proj weights in place (a custom init, a loaded timm state dict)
        so that mitigations that derive state from them (sigma_reparam's u, v, gamma) catch up."""
        layers = self.layers_by_role()
        for mitigation in self.mitigations.values():
            mitigation.reset_from_weights(layers)

    def mitigation_state_keys(self) -> dict[str, list[str]]:
        """Per option, the state_dict keys (relative to this module) holding its mitigation's state.

        A mitigation's own parameters and persistent buffers (``mitigations.<option>.*``),
        and the state of the layers it built beyond what the default layer has (sigma_reparam's
        ``qkv.gamma``, ``qkv.u``, ...: not ``weight`` and ``bias``, which nn.Linear has; none
        once folded; qk_norm's ``q_norm.weight``, ...: every key, the default being nn.Identity).
        Options without state are left out.
        """
        keys = {name: [f"mitigations.{name}.{key}" for key in mitigation.state_dict()]
                for name, mitigation in self.mitigations.items()}
        for role, option in self.layer_builders.items():
            default_keys = ("weight", "bias") if _DEFAULT_LAYERS[role] == "linear" else ()
            keys[option] += [f"{role}.{key}" for key in getattr(self, role).state_dict()
                             if key not in default_keys]
        return {name: names for name, names in keys.items() if names}

    def _absent_mitigations(self, state_dict: Mapping[str, Any], prefix: str) -> dict[str, list[str]]:
        """The options none of whose state is in ``state_dict``, when it holds this module's weights."""
        if prefix + "qkv.weight" not in state_dict:
            return {}
        return {name: keys for name, keys in self.mitigation_state_keys().items()
                if not any(prefix + key in state_dict for key in keys)}

    def saved_options(self) -> dict[str, Any]:
        """Per mitigation option, its :meth:`~Mitigation.saved_value` (recorded by state_dict)."""
        return {name: m.saved_value() for name, m in self.mitigations.items()}

    def _option_mismatches(self, local_metadata: Mapping[str, Any]) -> list[str]:
        """'option: checkpoint a, this module b' for each option both have, with other values."""
        saved = local_metadata.get(_OPTIONS_KEY) or {}
        current = self.saved_options()
        return [f"{name}: checkpoint {value!r}, this module {current[name]!r}"
                for name, value in sorted(saved.items())
                if name in current and current[name] != value]

    def _foreign_keys(self, state_dict: Mapping[str, Any], prefix: str) -> list[str]:
        """The state dict's keys under ``prefix`` that this module does not have."""
        own = {prefix + key for key in self.state_dict()}
        return sorted(key for key in state_dict if key.startswith(prefix) and key not in own)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        where = f"module {prefix[:-1]!r}" if prefix else type(self).__name__
        mismatches = self._option_mismatches(local_metadata)
        if mismatches:
            error_msgs.append(
                f"{where} was saved with other option values ({'; '.join(mismatches)}): build "
                f"it with the checkpoint's values, or, to change them on purpose, load "
                f"dict(state_dict), which drops the recorded options.")
        absent = self._absent_mitigations(state_dict, prefix)
        if absent:  # explained by _explain_absent_state once the keys are known to be missing
            self._absent_on_load = (prefix, absent, self._foreign_keys(state_dict, prefix))

    def _score_mods(self) -> tuple:
        """The mitigations' score modifiers, sorted by their score_order (stable)."""
        ordered = sorted(self.mitigations.values(), key=lambda m: m.score_order)
        return tuple(mod for m in ordered if (mod := m.score_mod()) is not None)

    def _normalizer(self):
        for mitigation in self.mitigations.values():
            normalizer = mitigation.normalizer()
            if normalizer is not None:
                return normalizer
        return SOFTMAX

    def _mitigation_health(self, call: AttentionCall) -> dict[str, Tensor]:
        layers = self.layers_by_role()
        return {f"{name}.{key}": value.detach() for name, m in self.mitigations.items()
                for key, value in m.health(layers, call).items()}

    def _check_input(self, x: Tensor, attn_mask: Tensor | None) -> None:
        if isinstance(x, torch.fx.Proxy):
            raise TypeError(
                "x is a torch.fx Proxy: torch.fx cannot trace inside RobustAttention (its forward "
                "dispatches on the observers, the probe switch and the kernel for x's device, dtype "
                "and mask, which a static graph would freeze). Trace it as a leaf module: timm's "
                "create_feature_extractor and features_only=True, feature_cls='fx' do once "
                "robust_attn.convert or robust_attn.layer has run; torchvision's "
                "create_feature_extractor(..., tracer_kwargs={'leaf_modules': [RobustAttention]}); "
                "or a torch.fx.Tracer whose is_leaf_module returns True for it")
        if not isinstance(x, Tensor) or x.dim() != 3:
            raise ValueError(f"x must be a (B, N, C) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x has width {x.shape[-1]} but this module has dim={self.dim}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating point tensor, got {x.dtype}")
        weight = self.qkv.weight
        if x.dtype != weight.dtype and not _autocast_casts(x, weight):
            raise TypeError(f"x has dtype {x.dtype} but this module's weights are {weight.dtype}: "
                            f"cast x (x.to({weight.dtype})) or the module (.to({x.dtype})), or "
                            f"run under torch.autocast")
        if attn_mask is None:
            return
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool (True = may attend) or an additive float "
                            f"tensor, got {attn_mask.dtype}")
        if attn_mask.device != x.device:
            raise ValueError(f"attn_mask is on {attn_mask.device} but x is on {x.device}: move the "
                             f"mask to x's device (attn_mask.to(x.device))")
        batch, tokens = x.shape[:2]
        target = (batch, self.num_heads, tokens, tokens)
        try:
            if attn_mask.dim() > 4 or torch.broadcast_shapes(attn_mask.shape, target) != target:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"(B, H, N, N) = {target}") from None

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, kernel={self.kernel!r}"


def _autocast_casts(x: Tensor, weight: Tensor) -> bool:
    """Whether autocast, enabled on x's device, casts both x and ``weight`` for the qkv matmul:
    it casts float32, float16 and bfloat16 tensors, never float64."""
    device = x.device.type
    return (torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
            and torch.float64 not in (x.dtype, weight.dtype))


def _kernel_mask(attn_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A mask broadcastable to (B, H, N, N) as every kernel takes it: viewed as 4-D (leading
    dimensions of size 1), and an additive float mask in the dtype of q (``dtype``), so that
    adding it keeps the logits in q's dtype (a float32 mask on a float16 module, say)."""
    if attn_mask is None:
        return None
    if attn_mask.is_floating_point() and attn_mask.dtype != dtype:
        attn_mask = attn_mask.to(dtype)
    return attn_mask[(None,) * (4 - attn_mask.dim())]


_OPTIONS_KEY = "robust_attn_options"


def _record_options(module: RobustAttention, state_dict, prefix: str, local_metadata) -> None:
    """state_dict hook: the mitigations' option values, in this module's metadata entry."""
    local_metadata[_OPTIONS_KEY] = module.saved_options()


class ExplainedKey(str):
    """A missing state-dict key that explains itself: equal (and hashing equal) to the key, so
    ``load_state_dict(strict=False)``'s missing_keys compare as before, while printing it (the
    message of a strict load's RuntimeError) adds why it is missing and what to do."""

    def __new__(cls, key: str, explanation: str) -> ExplainedKey:
        explained = super().__new__(cls, key)
        explained.explanation = explanation
        return explained

    def __str__(self) -> str:
        return f"{str.__str__(self)} ({self.explanation})"

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _explain_absent_state(module: RobustAttention, incompatible_keys) -> None:
    """load_state_dict post hook: the missing keys of mitigations whose state the state dict
    lacks (recorded by ``_load_from_state_dict`` of the same load) explain themselves. torch's
    public hook, instead of reading the caller's ``strict`` from its stack frame: a strict load
    raises with the explanation in its message, a non-strict one returns the same keys."""
    absent_on_load = module.__dict__.pop("_absent_on_load", None)
    if absent_on_load is None:
        return
    prefix, absent, foreign = absent_on_load
    where = f"module {prefix[:-1]!r}" if prefix else type(module).__name__
    keys = [prefix + key for names in absent.values() for key in names]
    if foreign:  # saved with other mitigations: load_upgrading would refuse it too
        explanation = (
            f"{where} has mitigation(s) {sorted(absent)} whose state the state dict lacks "
            f"({', '.join(keys)}), and the state dict holds state this module lacks "
            f"({', '.join(foreign)}): it was saved with other options (another preset). "
            f"Build the module with the checkpoint's options")
    else:
        explanation = (
            f"{where} has mitigation(s) {sorted(absent)} whose state the state dict lacks "
            f"({', '.join(keys)}): it was saved before they were added. To load it, keeping "
            f"their fresh state, call robust_attn.load_upgrading(model, state_dict)")
    missing = incompatible_keys.missing_keys
    for index, key in enumerate(missing):
        if key in keys:
            missing[index] = ExplainedKey(key, explanation)
            return  # one explanation per module


def load_upgrading(model: nn.Module, state_dict: Mapping[str, Any]) -> dict[str, list[str]]:
    """Load a checkpoint saved before mitigations were added to ``model``'s RobustAttention modules.

    ``model`` is a RobustAttention or any module containing some (a converted timm
    model, a stack). For each RobustAttention whose weights the state dict holds,
    a mitigation none of whose state it holds (:meth:`RobustAttention.mitigation_state_keys`)
    keeps its fresh state, and its ``reset_from_weights()`` recomputes whatever it
    derives from the loaded weights. Every other key must match as in a strict
    load: otherwise RuntimeError, raised before anything is loaded.

    Whether the upgraded module computes what the checkpoint computed depends on
    the fresh state: the same for ``sigma_reparam="preserve"`` (u, v: W's top singular
    vectors, and gamma = sigma(W), so W_hat = W) and ``sink_logit="preserve"`` (within
    float32); different for ``sigma_reparam=True`` (gamma = 1: W_hat = W / sigma(W)
    has unit spectral norm), ``sink_logit=True`` (softmax-off-by-one),
    ``sink_tokens``, ``gated`` (gates near 0.5) and ``qk_norm`` (fresh LayerNorms).

    Returns ``{module name: [options started fresh]}`` for the modules upgraded
    ("" names ``model`` itself).
    """
    upgrades: dict[str, tuple[RobustAttention, dict[str, list[str]]]] = {}
    fresh = set()  # the keys of the mitigation state that stays fresh
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, RobustAttention):
            absent = module._absent_mitigations(state_dict, prefix)
            if absent:
                upgrades[name] = module, absent
                fresh.update(prefix + key for keys in absent.values() for key in keys)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict) - fresh)
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise RuntimeError(f"load_upgrading: the state dict does not match {type(model).__name__} "
                           f"beyond absent mitigation state: missing keys {missing}, unexpected "
                           f"keys {unexpected}")
    model.load_state_dict(state_dict, strict=False)
    for module, absent in upgrades.values():
        for option in absent:
            module.mitigations[option].reset_from_weights(module.layers_by_role())
    return {name: sorted(absent) for name, (_, absent) in upgrades.items()}

"""sigmaReparam: spectrally reparametrised qkv and proj layers, against entropy collapse.

Every weight W of qkv and proj is replaced in the forward by (Zhai et al. 2023,
"Stabilizing Transformer Training by Preventing Attention Entropy Collapse",
ICML 2023, arXiv:2303.06296)::

    W_hat = (gamma / sigma(W)) W,    sigma(W) = u^T W v    (the bias is not reparametrised)

with a learnable scalar gamma and u, v the current estimates of W's top left and
right singular vectors, refined by one power-iteration step per training forward
(the paper's PyTorch-style pseudocode)::

    u <- W v / ||W v||,    v <- W^T u / ||W^T u||

The step runs under no_grad in float32 (autocast off), so u and v are constants
for autograd, while sigma = u^T W v is differentiable in W (the paper's
pseudocode computes sigma the same way, outside no_grad).

Theorem 3.1 of the paper bounds every query row's attention entropy from below:
with s = ||W_K W_Q^T||_2 ||X X^T||_2 (the logits' spectral scale) and T keys,

    beta = exp(-s sqrt(T / (T - 1))),
    Ent(A_i) >= log(1 + (T - 1) beta) + s sqrt(T (T - 1)) beta / (1 + (T - 1) beta),

which falls exponentially in s; sigmaReparam keeps s in check through gamma.

Followed as published: the update rule and sigma above; gamma = 1 for a fresh
layer (the pseudocode's ``gamma = ones(1)``); one step per training forward; the
bias left plain and the sigma computation kept in float32 (both as in
apple/ml-sigma-reparam, vision/layers.py). Also as in that code: u, v are
warm-started at the weight's top singular vectors (the pseudocode draws them at random;
that code takes an SVD, we take Lanczos iterations, within float32 rounding of it at
ViT-B's width in a fraction of the time: :func:`top_singular_vectors`), and the buffers
change only in training mode.

Our choices, where the paper is silent:
  * ``sigma_reparam="preserve"`` starts gamma = sigma(W), so W_hat = W and the
    layer computes what nn.Linear computes (apple/ml-sigma-reparam's ViT code
    initialises its gamma the same way); use it when converting pretrained weights.
  * Eval mode runs no power-iteration step: it uses u, v as the last training
    forward left them, so eval, ``fold()`` and the inference weight agree exactly
    (apple/ml-sigma-reparam's eval runs one step from the stored vector and
    discards it).
  * u and v are cloned before sigma is computed: autograd saves the clones, so
    a later training forward may update the buffers in place before backward
    (the two-forwards-one-backward failure of torch.nn.utils.spectral_norm).
  * gamma is a one-element parameter of shape (1,), not 0-dim: FSDP2 (``fully_shard``)
    shards parameters on dim 0 and refuses scalars. Optimizer groups that exclude
    ndim <= 1 parameters from weight decay (timm's, the recipes') still exclude it.
    A 0-dim gamma from an older checkpoint loads, reshaped.
  * Distributed: DDP replicates the layer whole. Under FSDP2 the forward sees the
    all-gathered weight, so sigma is the full weight's and u, v (buffers, never
    sharded) take the same step on every rank. Outside the forward the parameters
    are sharded DTensors: ``sigma()``, ``effective_weight()``, ``fold()``,
    ``warm_start()`` and ``preserve_function()`` then gather the full weight first,
    which is a collective: call them on every rank.
  * Health (keys prefixed ``sigma_reparam.`` in ``AttentionHealth.extras``):
    ``qkv.sigma``, ``proj.sigma``: the power-iteration estimate of sigma(W);
    ``qkv.gamma``, ``proj.gamma``; ``q.spectral_norm``, ``k.spectral_norm``: the
    exact spectral norms of the effective q block [W_hat_q, b_q] (its bias as an
    extra column) and k block W_hat_k (the first two thirds of qkv's rows);
    ``entropy_bound``: Theorem 3.1's bound with
    s = scale ||[W_hat_q, b_q]||_2 ||W_hat_k||_2 ||[X, 1]||_2 ||X||_2, divided
    by log(N) like ``AttentionHealth.entropy``, for the batch's weakest sequence.
    This s bounds every head's centred logit rows (the key bias adds a constant
    to each row, which softmax ignores; the query bias is the ones column), so
    the bound holds, looser than the theorem's own s. It assumes the logits are
    scale (x W_q^T + b_q)(x W_k^T + b_k)^T over all N tokens: it does not hold
    with masks (causal included), qk_norm, other q/k transforms, score modifiers,
    extra keys or a normalizer other than softmax. Where a matrix is not finite (a nan
    input or weight) its spectral norm, and so the bound, is nan (:func:`spectral_norm`):
    the health probe reports non-finite values, it does not fail on them.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._compat import full_tensor as _whole
from .._compat import local_tensor as _local
from ..claim import NO_ENTROPY_COLLAPSE, RANK, Claim, witnesses_at
from ..config import AttentionConfig
from ..logit_limit import block_norms
from .base import HostLayers, LayerSpec, Mitigation

if TYPE_CHECKING:
    from ..call import AttentionCall

_LAYER_ROLES = ("qkv", "proj")  # the layers it reparametrises


def _autocast_off(tensor: Tensor):
    """A context in which matmuls on ``tensor``'s device run in the dtype they are given (a
    device without autocast, such as ``meta``, always does)."""
    if not torch.amp.is_autocast_available(tensor.device.type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=tensor.device.type, enabled=False)


WARM_START_STEPS = 48
"""Lanczos steps of :func:`top_singular_vectors` (fewer on a matrix whose smaller side is
shorter, where min(m, n) + 1 steps are exact): at ViT-B's widths (2304 x 768, 768 x 768,
nn.Linear's draw) sigma is then within float32 rounding of the SVD's."""


def top_singular_vectors(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(u, v): unit float32 estimates of the (m, n) ``weight``'s top left and right singular
    vectors, with u^T W v > 0, by Golub-Kahan-Lanczos bidiagonalisation (Golub & Van Loan,
    Matrix Computations, 4th ed., section 10.4) with full reorthogonalisation.

    k = min(m, n) + 1 steps (at most :data:`WARM_START_STEPS`) of the power iterations
    v -> W^T W v from a fixed start vector (a seeded draw, not the global RNG), keeping
    every iterate: W V_k = U_k B_k with B_k (k, k) upper bidiagonal, and (u, v) = (U_k p,
    V_k q) for B_k's top singular pair (p, q). Plain power iteration keeps only the last
    iterate and converges like (sigma_2 / sigma_1)^(2k): on nn.Linear's draws, whose top
    singular values lie close together, 100 steps left sigma 1e-3 low at 768 x 768 and 1e-2
    on small matrices (measured, tests/test_sigma_reparam.py compares with the SVD). Where
    W V_j is spanned before the k-th step (a rank below k) the further vectors are zero and
    add nothing. Replaces an SVD (seconds at ViT-B's width on a 2-core CPU) with 2k
    matrix-vector products; runs on any device, meta included (no data-dependent branch)."""
    weight = weight.float()
    rows, columns = weight.shape
    steps = min(min(rows, columns) + 1, WARM_START_STEPS)
    left, right = weight.new_zeros(steps, rows), weight.new_zeros(steps, columns)
    alpha, beta = weight.new_zeros(steps), weight.new_zeros(steps)
    start = torch.randn(columns, generator=torch.Generator().manual_seed(0))
    v, u = F.normalize(start.to(weight.device), dim=0), weight.new_zeros(rows)
    for j in range(steps):
        right[j] = v
        u = weight @ v - beta[j - 1] * u if j else weight @ v
        u = u - left[:j].T @ (left[:j] @ u)
        alpha[j] = u.norm()
        left[j] = u = F.normalize(u, dim=0)
        v = weight.T @ u - alpha[j] * v
        v = v - right[:j + 1].T @ (right[:j + 1] @ v)
        beta[j] = v.norm()
        v = F.normalize(v, dim=0)
    bidiagonal = torch.diag(alpha) + torch.diag(beta[:-1], 1)
    p, _, q = torch.linalg.svd(bidiagonal)
    return F.normalize(left.T @ p[:, 0], dim=0), F.normalize(right.T @ q[0], dim=0)


class _SpectrallyScaled(torch.autograd.Function):
    """W_hat = gamma W / sigma(W), sigma(W) = u^T W v with u, v constants, in one node.

    The same value and gradients as autograd through ``gamma / einsum(u, W, v) * W``, in fewer
    passes over W: with g = dL/dW_hat, s = gamma / sigma and c = <g, W> (one pass),

        dL/dW     = s g - (gamma c / sigma^2) u v^T      (d sigma / dW = u v^T)
        dL/dgamma = c / sigma

    sigma and c in float32 (autocast off), W_hat and dL/dW in W's dtype. Tested against the
    einsum form (tests/test_sigma_reparam.py)."""

    @staticmethod
    def forward(ctx, weight: Tensor, gamma: Tensor, u: Tensor, v: Tensor) -> Tensor:
        with _autocast_off(weight):
            sigma = torch.dot(u, torch.mv(weight.float(), v))
        scale = gamma.float().reshape(()) / sigma
        ctx.save_for_backward(weight, gamma, u, v, sigma)
        return weight * scale.to(weight.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, gamma, u, v, sigma = ctx.saved_tensors
        gamma32 = gamma.float().reshape(())
        with _autocast_off(weight):
            inner = torch.dot(grad.float().flatten(), weight.float().flatten())
        d_weight = (grad.float() * (gamma32 / sigma)).addcmul_(
            (-gamma32 * inner / sigma.square() * u)[:, None], v[None, :])
        return (d_weight.to(weight.dtype), (inner / sigma).reshape(gamma.shape).to(gamma.dtype),
                None, None)


class SigmaReparamLinear(nn.Module):
    """nn.Linear computing x W_hat^T + b, W_hat = (gamma / sigma(W)) W (see the module docstring).

    Keeps nn.Linear's ``weight`` and ``bias`` (so timm weights load onto it) and
    adds the parameter ``gamma`` and the float32 buffers ``u`` (out_features) and
    ``v`` (in_features), which stay float32 when the module is cast (``.half()``,
    ``.to(torch.bfloat16)``): the power iteration runs in float32 whatever the weights' dtype.
    It is not an nn.Linear subclass on purpose: code that finds nn.Linear modules and reads
    ``.weight`` directly would skip W_hat.

    Args:
        in_features, out_features, bias, device, dtype: as nn.Linear, whose
            initialisation it uses (the same draw as nn.Linear under the same seed).
        preserve: start gamma = sigma(W) (W_hat = W) instead of gamma = 1.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 preserve: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self._adopt(linear, preserve)

    @classmethod
    def from_linear(cls, linear: nn.Linear, preserve: bool = True) -> SigmaReparamLinear:
        """Reparametrise ``linear``, sharing its weight and bias parameters (no copy)."""
        layer = cls.__new__(cls)  # skips __init__'s own nn.Linear: no second draw from the RNG
        nn.Module.__init__(layer)
        layer._adopt(linear, preserve)
        return layer

    def _adopt(self, linear: nn.Linear, preserve: bool) -> None:
        if not isinstance(preserve, bool):
            raise ValueError(f"preserve={preserve!r}: expected True or False")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.preserve = preserve
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        self.gamma = nn.Parameter(linear.weight.new_ones(1))
        factory = {"device": linear.weight.device, "dtype": torch.float32}
        self.register_buffer("u", torch.empty(self.out_features, **factory))
        self.register_buffer("v", torch.empty(self.in_features, **factory))
        if preserve:
            self.preserve_function()
        else:
            self.warm_start()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw W and b as nn.Linear does and start gamma, u, v as at construction (e.g. after
        ``to_empty`` on a layer built on the meta device)."""
        nn.Linear.reset_parameters(self)  # reads only weight, bias and in_features
        if getattr(self, "preserve", False):  # absent from layers pickled before it
            self.preserve_function()
        else:
            _local(self.gamma).fill_(1.0)
            self.warm_start()

    @torch.no_grad()
    def warm_start(self) -> None:
        """u, v <- the weight's top singular vectors (:func:`top_singular_vectors`). Call after
        loading weights. On the meta device there is nothing to compute (shapes only: the
        iterations would cost time and give nothing; ``reset_parameters`` after ``to_empty``
        warm-starts for real)."""
        if self.weight.device.type == "meta":
            return
        u, v = top_singular_vectors(_whole(self.weight))
        self.u.copy_(u)
        self.v.copy_(v)

    @torch.no_grad()
    def preserve_function(self) -> None:
        """Warm-start u, v and set gamma = sigma(W): W_hat = W, the current weight's function."""
        self.warm_start()
        _local(self.gamma).fill_(self.sigma())  # gamma's one value, on whichever rank holds it

    @torch.no_grad()
    def _power_iteration_step(self) -> None:
        with _autocast_off(self.weight):
            weight = _whole(self.weight).float()
            u = F.normalize(weight @ self.v.float(), dim=0)
            v = F.normalize(weight.T @ u, dim=0)
        self.u.copy_(u)
        self.v.copy_(v)

    def sigma(self) -> Tensor:
        """sigma(W) = u^T W v in float32; differentiable in W, with u and v constants."""
        return self._sigma(_whole(self.weight))

    def _sigma(self, weight: Tensor) -> Tensor:
        # Copies: autograd saves them, so the buffers may change in place before backward.
        u, v = (vector.to(torch.float32, copy=True) for vector in (self.u, self.v))
        with _autocast_off(weight):
            return torch.einsum("o,oi,i->", u, weight.float(), v)

    def effective_weight(self) -> Tensor:
        """W_hat = (gamma / sigma(W)) W, in the weight's dtype (:class:`_SpectrallyScaled`)."""
        u, v = (vector.to(torch.float32, copy=True) for vector in (self.u, self.v))
        return _SpectrallyScaled.apply(_whole(self.weight), _whole(self.gamma), u, v)

    @torch.no_grad()
    def block_norms(self, width: int) -> tuple[float, float]:
        """Frobenius norms of W_hat's first two ``width``-row blocks (q and k of a qkv layer), for
        the overflow refusal's cheap bound (robust_attn.logit_limit): |gamma| / sigma(W) times
        W's, which logit_limit.block_norms remembers until W changes."""
        factor = float((_whole(self.gamma).float().reshape(()) / self.sigma()).abs())  # inf at 0
        norms = block_norms(_whole(self.weight), width)
        return norms[0] * factor, norms[1] * factor

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            self._power_iteration_step()
        return F.linear(x, self.effective_weight(), self.bias)

    @torch.no_grad()
    def fold(self) -> nn.Linear:
        """A plain nn.Linear with weight W_hat (as eval mode computes it) and the same bias."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                           device="meta")
        linear.weight = nn.Parameter(self.effective_weight())
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.clone())
        return linear

    def _apply(self, fn, recurse: bool = True):
        """nn.Module._apply (behind .to(), .half(), .bfloat16(), .cuda(), ...), keeping u and v in
        float32: a conversion of the module's dtype moves them to its device, their dtype stays."""
        vectors = {name: self._buffers[name] for name in ("u", "v")}
        super()._apply(fn, recurse)
        for name, before in vectors.items():
            if self._buffers[name].dtype != torch.float32:
                self._buffers[name] = before.to(self._buffers[name].device)
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        gamma = state_dict.get(prefix + "gamma")
        if gamma is not None and gamma.dim() == 0:  # saved while gamma was 0-dim
            state_dict = {**state_dict, prefix + "gamma": gamma.reshape(1)}
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


def _replace_modules(model: nn.Module, convert: Callable[[nn.Module], nn.Module | None],
                     done: dict[int, nn.Module] | None = None) -> nn.Module:
    """``model`` with every module that ``convert`` maps to a replacement replaced, in place.

    A module reached twice (shared) is converted once; the root's replacement is returned.
    """
    done = {} if done is None else done
    if id(model) in done:
        return done[id(model)]
    replacement = convert(model)
    if replacement is None:
        for name, child in model.named_children():
            setattr(model, name, _replace_modules(child, convert, done))
        replacement = model
    done[id(model)] = replacement
    return replacement


def fold_sigma_reparam(model: nn.Module) -> nn.Module:
    """Replace every SigmaReparamLinear in ``model`` by its ``fold()``, in place, for inference.

    Returns ``model`` (the folded layer when ``model`` itself is a SigmaReparamLinear).
    A RobustAttention keeps its ``sigma_reparam`` mitigation, whose health then
    describes the layers as they were when folded.

    Folding is for inference: the folded qkv and proj are plain nn.Linear layers, so
    training them trains W_hat directly, without the reparametrisation. Putting a
    folded module back in training mode (``.train()``) therefore warns
    (:class:`FoldedTrainingWarning`); to train with sigmaReparam, train the unfolded
    model (keep its checkpoint) and fold again afterwards.
    """
    def folded(module: nn.Module) -> nn.Module | None:
        return module.fold() if isinstance(module, SigmaReparamLinear) else None

    model = _replace_modules(model, folded)
    for module in model.modules():
        if isinstance(module, SigmaReparam):
            module.folded = True
    return model


class FoldedTrainingWarning(UserWarning):
    """A module whose sigma_reparam layers were folded was put in training mode."""


def sigma_reparametrize(model: nn.Module, preserve: bool = True) -> nn.Module:
    """Replace every nn.Linear of ``model`` by a SigmaReparamLinear sharing its parameters.

    The paper's "every linear layer" option. ``preserve`` (default) keeps the
    model's function (gamma = sigma(W)); False starts gamma = 1. Only modules of
    type exactly nn.Linear are converted: subclasses such as the ``out_proj`` of
    nn.MultiheadAttention, whose parent reads ``.weight`` directly, are left alone.
    Returns ``model`` (the new layer when ``model`` itself is an nn.Linear).
    """
    def reparametrized(module: nn.Module) -> nn.Module | None:
        if type(module) is not nn.Linear:
            return None
        return SigmaReparamLinear.from_linear(module, preserve)

    return _replace_modules(model, reparametrized)


def spectral_norm(matrices: Tensor) -> Tensor:
    """||M||_2, the largest singular value, of each matrix in the last two dimensions; nan for a
    matrix holding a nan or an inf (whose SVD LAPACK refuses: the entries are zeroed for the SVD,
    then its result replaced by nan). No host synchronisation."""
    finite = torch.isfinite(matrices).all(dim=-1).all(dim=-1)
    norms = torch.linalg.matrix_norm(matrices.nan_to_num(0.0, 0.0, 0.0), ord=2)
    return torch.where(finite, norms, torch.nan)


def attention_entropy_lower_bound(logit_scale: Tensor, num_keys: int) -> Tensor:
    """Zhai et al. (2023), Theorem 3.1: the least entropy of a softmax row over T = num_keys keys.

    ``logit_scale`` is s = ||W_K W_Q^T||_2 ||X X^T||_2 (or any upper bound of it)::

        beta = exp(-s sqrt(T / (T - 1)))
        H   >= log(1 + (T - 1) beta) + s sqrt(T (T - 1)) beta / (1 + (T - 1) beta)

    The bound is the entropy of a row whose one logit exceeds the T - 1 others by
    s sqrt(T / (T - 1)) (tight). Returned divided by log(T), like
    :func:`robust_attn.metrics.attention_entropy`; 1.0 when T <= 1.
    """
    if num_keys <= 1:
        return torch.ones_like(logit_scale)
    beta = torch.exp(-logit_scale * math.sqrt(num_keys / (num_keys - 1)))
    spread = 1 + (num_keys - 1) * beta
    entropy = spread.log() + logit_scale * math.sqrt(num_keys * (num_keys - 1)) * beta / spread
    return entropy / math.log(num_keys)


class SigmaReparam(Mitigation):
    """Builds qkv and proj as SigmaReparamLinear; reports sigma, gamma and Theorem 3.1's bound.

    Option ``sigma_reparam``: True (gamma = 1, the paper) or "preserve"
    (gamma = sigma(W), the function unchanged). Plain weights (a timm or baseline
    state dict, without gamma, u and v) load with
    :func:`robust_attn.attention.load_upgrading`, which calls :meth:`reset_from_weights`;
    a strict ``load_state_dict`` refuses them, naming that function.
    """

    option = "sigma_reparam"
    # Early warnings: code -> (rank among the presets suggested for it, 1 first; why it helps).
    advice_preset = 'sigma_reparam'
    advice = {
        'entropy_collapse': (1, "sigma-reparametrised W_q, W_k bound the logits' growth (Zhai et al. 2023)"),
        'entropy_falling': (1, "sigma-reparametrised W_q, W_k bound the logits' growth (Zhai et al. 2023)"),
        'loss_spike': (2, 'and entropy collapse (Zhai et al. 2023)'),
        'loss_oscillation': (2, 'so do spectrally normalised weights'),
        'vanishing_gradients': (2, 'or when the softmax saturates (entropy collapse)'),
        'exploding_gradients': (1, "spectral normalisation bounds each layer's gain (Zhai et al. 2023)"),
    }
    claims = (
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
    )
    # W_hat = gamma W / sigma(W) on qkv and proj, gamma = 1 as in the paper.
    presets = {"sigma_reparam": {"sigma_reparam": True}}
    preserving_values = {True: "preserve"}
    health_reductions = {"entropy_bound": "min"}  # the bound of the weakest sequence

    def __init__(self, config: AttentionConfig, preserve: bool) -> None:
        super().__init__()
        self.preserve = preserve
        self.scale = config.head_dim ** -0.5
        self.attn_dim = config.attn_dim
        # Plain dict, not submodules: RobustAttention owns the layers and their state_dict keys.
        self._layers: dict[str, SigmaReparamLinear] = {}
        self.folded = False  # set by fold_sigma_reparam: qkv and proj are plain nn.Linear now

    @classmethod
    def from_option(cls, value: Any, config: AttentionConfig) -> SigmaReparam | None:
        if value is None or value is False:
            return None
        if value is not True and not (isinstance(value, str) and value == "preserve"):
            raise ValueError(f"sigma_reparam={value!r}: expected True, 'preserve', False or None")
        return cls(config, preserve=value == "preserve")

    def make_layer(self, spec: LayerSpec, config: AttentionConfig) -> SigmaReparamLinear | None:
        if spec.role not in _LAYER_ROLES:
            return None
        layer = SigmaReparamLinear(spec.in_features, spec.out_features, spec.bias,
                                   preserve=self.preserve, **config.factory_kwargs)
        self._layers[spec.role] = layer
        return layer

    def train(self, mode: bool = True) -> SigmaReparam:
        if mode and getattr(self, "folded", False):  # absent from modules pickled before it
            warnings.warn("sigma_reparam was folded (fold_sigma_reparam): in training mode the "
                          "folded qkv and proj train as plain nn.Linear layers, without the "
                          "reparametrisation W_hat = gamma W / sigma(W); to train with it, train "
                          "the unfolded model and fold afterwards", FoldedTrainingWarning,
                          stacklevel=3)
        return super().train(mode)

    def reset_from_weights(self, layers: HostLayers) -> None:
        """Re-warm u, v from the current weights, and with "preserve" set gamma = sigma(W) again."""
        for layer in self._layers.values():
            if self.preserve:
                layer.preserve_function()
            else:
                layer.warm_start()

    @torch.no_grad()
    def health(self, layers: HostLayers, call: AttentionCall | None = None) -> dict[str, Tensor]:
        stats = {}
        for role, layer in self._layers.items():
            stats[f"{role}.sigma"] = layer.sigma()
            stats[f"{role}.gamma"] = layer.gamma.detach().float().reshape(()).clone()
        w_q, w_k, _ = self._layers["qkv"].effective_weight().float().split(self.attn_dim)
        stats["q.spectral_norm"] = spectral_norm(self._with_bias_column(w_q))
        stats["k.spectral_norm"] = spectral_norm(w_k)
        if call is not None:  # the bound needs the call's input X
            stats["entropy_bound"] = self._entropy_bound(
                call.x.float(), stats["q.spectral_norm"] * stats["k.spectral_norm"])
        return stats

    def _with_bias_column(self, w_q: Tensor) -> Tensor:
        """[W_hat_q, b_q] when qkv has a bias, else W_hat_q."""
        bias = self._layers["qkv"].bias
        if bias is None:
            return w_q
        return torch.cat([w_q, bias[:self.attn_dim].float()[:, None]], dim=1)

    def _entropy_bound(self, x: Tensor, qk_norm_product: Tensor) -> Tensor:
        """Theorem 3.1's normalised bound for the batch's sequence with the weakest one."""
        queries = x if self._layers["qkv"].bias is None else F.pad(x, (0, 1), value=1.0)
        input_norms = spectral_norm(queries) * spectral_norm(x)
        logit_scale = self.scale * qk_norm_product * input_norms
        return attention_entropy_lower_bound(logit_scale, x.shape[-2]).amin()

    def keeps_function(self, source: nn.Module) -> bool:
        return self.preserve  # gamma = sigma(W): W_hat = W

    def timm_expressible(self, host: nn.Module) -> bool:
        return True  # folded into plain weights on revert

    def extra_repr(self) -> str:
        return f"preserve={self.preserve}"

"""Refuse attention logits that overflow, before any kernel runs: sync-free and compile friendly.

Every kernel computes the logits s_ij = scale q_i . k_j (robust_attn.problem). By
Cauchy-Schwarz (|a . b| <= ||a|| ||b||), for every query i and key j of the batch::

    |s_ij|  <=  bound  =  scale * max_i ||q_i|| * max_j ||k_j||

computed here in float32 (float64 for float64 q, k) on the detached q and k (after qk_norm,
every q/k transform and the keys a mitigation prepends; before score modifiers and the mask).
RobustAttention.forward asserts ``not (bound > limit) or not all_finite(x)`` with
``torch._assert_async`` (robust_attn._compat.assert_async): no host synchronisation (on CUDA
the error surfaces at the next synchronisation), traced by ``torch.compile(fullgraph=True)``.
It raises RuntimeError with a message that starts with "x:". On the CPU outside torch.compile,
where reading a value costs no synchronisation, the bound is read first and x's finiteness pass
runs only when it exceeds the limit (:func:`refuse_unless_within`): measured at ViT-S (B=8, one
thread), that pass was 0.15-0.2 ms of an 18 ms inference forward; what is refused is unchanged.

The exact bound costs two row-norm passes over q and k (rows of D = 64 elements: measured at
ViT-S, B=8, one CPU thread, 0.7-1.4 ms each right after the qkv projection, 4-8 % of an
inference forward). Where the bound can be read for free (:func:`reads_freely`) and q, k are
float32 or float64 as computed, a cheaper upper bound of the row norms is tried first
(:func:`row_norm_bounds`): from the norm layers' parameters alone after qk_norm's LayerNorm or
RMSNorm, or, where q and k are the heads of a plain nn.Linear qkv (no transform after it),
from ``max_i ||x_i||`` and the q and k blocks' Frobenius norms (one pass over x, rows of C).
When it is within half the limit (room for rounding), every logit is within the limit and the
exact bound is skipped; otherwise the exact bound decides as before, so what is refused is
unchanged. benchmarks/dense_overhead.py measures what remains. ``with overflow_refusal(False):``
skips the checks in the calling thread for the block's length, for inference on inputs known to
be in range.

Only a finite x is refused: an x holding a nan or an inf passes (its non-finite values reach the
output, where the health probe's ``health.nonfinite`` and :func:`robust_attn.nonfinite_guard`
report them), and so does a nan bound (nan weights: ``nan > limit`` is False). The bound alone
cannot tell an inf input from finite values whose squares overflow (float32's ``vector_norm``
is inf from a row norm of 1.8e19), hence the test of x: one ``aminmax`` pass, nan propagating.

The limit, ``logit_limit(dtype)``, is the bound's largest allowed value:

- ``FLOAT16_LOGIT_LIMIT = 2**15`` where the logits are float16 (a float16 module, or float16
  autocast): the eager and chunked kernels compute float16 logits, which overflow at 65504,
  giving nan attention (measured: max |logit| 1e5). Half of 65504 leaves room for the rounding
  of scale * q . k in float16 (relative D * 2^-11, below 2 for D <= 2048).
- ``LOGIT_LIMIT = 1e8`` otherwise (float32, bfloat16, float64). Measured on the CPU (torch
  2.14): SDPA's backward first returns inf where eager is finite at max |logit| ~ 2e30 (inputs
  ~ 1e15 of a module with unit-scale weights), and eager's logits overflow at 3.4e38. Far below
  that, from 2^24 ~ 1.7e7, adjacent float32 values are 2 apart (bfloat16's from 256), so a
  logit's rounding error exceeds 1: the attention weights are set by rounding and kernels
  disagree by O(1) (eps (1 + L) > 1 in robust_attn.testing.tolerances' error model), and
  nothing is lost by refusing. 1e8 is 6x that horizon (the bound overestimates the largest
  logit, typically by ~sqrt(D) for unaligned q and k) and far above the logits of any trained
  model. float64 has the same limit (and the same NORM_INPUT_LIMIT), so that a float64
  reference refuses what its float32 twin refuses; no softmax needs such logits (its weights
  are one-hot from logit differences of ~100).

A normalisation of q and k (qk_norm: LayerNorm, or any ``norm_layer`` that squares its input)
returns nan from a finite q once squares overflow float32, from a row norm of about 1.9e19
(measured for LayerNorm). Where q and k are normalised, the raw rows' largest norm must also
stay below ``NORM_INPUT_LIMIT = 2**60`` (1.2e18, squares 250x below float32's largest).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Final

import torch
from torch import Tensor, nn
from torch.utils.weak import WeakIdKeyDictionary

from ._compat import assert_async

LOGIT_LIMIT: Final = 1e8
FLOAT16_LOGIT_LIMIT: Final = 2.0 ** 15
NORM_INPUT_LIMIT: Final = 2.0 ** 60

_NORMALISE = "normalise x (e.g. a LayerNorm before attention)"
_IF_DIVERGED = "if training diverged, lower the learning rate or clip gradients"


def logits_dtype(dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype the kernels compute logits in: q's ``dtype``, or the autocast dtype where autocast
    is enabled on ``device_type`` (it casts float32, float16 and bfloat16 matmuls, not float64).
    Devices without autocast (``meta``, used for shape inference) compute in ``dtype``."""
    if (dtype != torch.float64 and torch.amp.is_autocast_available(device_type)
            and torch.is_autocast_enabled(device_type)):
        return torch.get_autocast_dtype(device_type)
    return dtype


def logit_limit(dtype: torch.dtype) -> float:
    """The largest allowed logit bound for logits computed in ``dtype`` (module docstring)."""
    return FLOAT16_LOGIT_LIMIT if dtype == torch.float16 else LOGIT_LIMIT


def all_finite(tensor: Tensor) -> Tensor:
    """0-dim bool: every entry of ``tensor`` is finite (True when it is empty); one aminmax pass,
    which propagates nan, no host synchronisation."""
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    low, high = torch.aminmax(tensor.detach())
    return torch.isfinite(low) & torch.isfinite(high)


def largest_row_norm(tensor: Tensor) -> Tensor:
    """max over rows of ||row||_2 (the last dimension), detached, in float32 (float64 for a
    float64 tensor), 0 when there is no row: a 0-dim tensor."""
    dtype = torch.promote_types(tensor.dtype, torch.float32)
    if tensor.numel() == 0:
        return torch.zeros((), dtype=dtype, device=tensor.device)
    return torch.linalg.vector_norm(tensor.detach(), dim=-1, dtype=dtype).amax()


def logit_bound(q: Tensor, k: Tensor, scale: float) -> Tensor:
    """scale * max_i ||q_i|| * max_j ||k_j|| (:func:`largest_row_norm`): bounds every
    |scale q_i . k_j| (0-dim)."""
    return scale * largest_row_norm(q) * largest_row_norm(k)


# The cheap bound must be within limit / CHEAP_BOUND_MARGIN to skip the exact one: room for the
# rounding of q and k as computed (relative C * eps(float32) ~ 2e-5 at C = 384) and of the bound.
CHEAP_BOUND_MARGIN: Final = 2.0
# Norm layers y = gamma * z + beta (gamma, beta optional) with ||z|| <= sqrt(D) for every row:
# LayerNorm's z = (x - mean) / sqrt(var + eps), ||z||^2 = D var / (var + eps); RMSNorm's
# z = x / sqrt(mean(x^2) + eps), ||z||^2 = D ms / (ms + eps). Exact types only: a subclass may
# compute something else.
_UNIT_RMS_NORMS = (nn.LayerNorm, nn.RMSNorm)


Bounds = tuple[float, float]


def normalised_row_norm_bound(norm: nn.Module, width: int) -> float | None:
    """An upper bound of every row norm of ``norm``'s output for rows of ``width``, from its
    parameters alone: ||gamma * z + beta|| <= max |gamma| sqrt(D) + ||beta|| (triangle
    inequality, ||z|| <= sqrt(D): see _UNIT_RMS_NORMS). None for any layer other than
    nn.LayerNorm and nn.RMSNorm (a subclass may compute something else)."""
    if type(norm) not in _UNIT_RMS_NORMS:
        return None
    weight, bias = norm.weight, getattr(norm, "bias", None)
    bound = math.sqrt(width)
    if weight is not None:
        bound *= _remembered(weight, "largest", lambda: float(weight.detach().abs().amax()))
    if bias is not None:
        bound += _remembered(bias, "norm", lambda: float(
            torch.linalg.vector_norm(bias.detach(), dtype=_wide(bias))))
    return bound


def projected_row_norm_bounds(x: Tensor, qkv: nn.Module, width: int) -> Bounds | None:
    """Upper bounds of max ||q_i^h|| and max ||k_j^h|| over every head and token, where q and k
    are the first two ``width``-wide output blocks of ``qkv(x)`` split into heads: for a plain
    nn.Linear, ||W^h x_i + b^h|| <= ||W^h||_2 ||x_i|| + ||b^h|| <= ||W||_F max_i ||x_i|| + ||b||
    (triangle and Cauchy-Schwarz inequalities; W^h a head's rows of the q or k block W). One pass
    over x (rows of C) and one over the q, k weights. A layer computing x W_hat^T + b with
    another effective weight (sigma_reparam's) gives W_hat's block norms by its
    ``block_norms(width)`` method; None for any other layer."""
    if type(qkv) is nn.Linear:
        weight_q, weight_k = block_norms(qkv.weight, width)
    elif callable(getattr(qkv, "block_norms", None)):
        weight_q, weight_k = qkv.block_norms(width)
    else:
        return None
    largest = float(largest_row_norm(x))
    bias_q, bias_k = (0.0, 0.0) if qkv.bias is None else block_norms(qkv.bias, width)
    return weight_q * largest + bias_q, weight_k * largest + bias_k


# parameter -> {what: (its version and storage, the value)}: parameters change in place (an
# optimizer step, a load) and bump their version; inference reuses them call after call.
_REMEMBERED = WeakIdKeyDictionary()


def _remembered(parameter: Tensor, what: Hashable, compute: Callable[[], Any]) -> Any:
    """``compute()``, a function of ``parameter``'s values, remembered per parameter and ``what``
    until the parameter changes in place (its version counter) or is replaced (its storage), so
    inference, which calls with the same weights every time, computes it once. An inference
    tensor (a module built under torch.inference_mode) has no version counter: computed anew."""
    if parameter.is_inference():
        return compute()
    key = (parameter._version, parameter.data_ptr())
    found = _REMEMBERED.setdefault(parameter, {}).get(what)
    if found is not None and found[0] == key:
        return found[1]
    value = compute()
    _REMEMBERED[parameter][what] = key, value
    return value


def block_norms(parameter: Tensor, width: int) -> Bounds:
    """The Frobenius norms of the q and k blocks of a qkv weight (3 W, C) or bias (3 W,): its
    first two ``width``-row blocks, in float32 or wider, remembered (:func:`_remembered`)."""
    def compute() -> Bounds:
        blocks = parameter.detach()[:2 * width].reshape(2, -1)
        norms = torch.linalg.vector_norm(blocks, dim=-1, dtype=_wide(parameter)).tolist()
        return norms[0], norms[1]

    return _remembered(parameter, ("blocks", width), compute)


def row_norm_bounds(x: Tensor, qkv: nn.Module, q_norm: nn.Module, k_norm: nn.Module,
                    width: int, head_dim: int) -> Bounds | None:
    """Upper bounds of max ||q_i|| and max ||k_j|| for q, k = q_norm, k_norm of qkv(x)'s heads:
    :func:`normalised_row_norm_bound` where both are LayerNorm or RMSNorm,
    :func:`projected_row_norm_bounds` where both are nn.Identity; None otherwise."""
    if isinstance(q_norm, nn.Identity) and isinstance(k_norm, nn.Identity):
        return projected_row_norm_bounds(x, qkv, width)
    q_bound, k_bound = (normalised_row_norm_bound(norm, head_dim) for norm in (q_norm, k_norm))
    return None if q_bound is None or k_bound is None else (q_bound, k_bound)


def _wide(tensor: Tensor) -> torch.dtype:
    """float32, or float64 for a float64 tensor: the dtype norms are taken in."""
    return torch.promote_types(tensor.dtype, torch.float32)


def _within_cheaply(tensor: Tensor, bound: Callable[[], float | None] | None,
                    limit: float) -> bool:
    """Whether the cheap ``bound()`` shows the quantity within ``limit`` (module docstring): only
    where reading it is free and ``tensor`` (q) is float32 or float64 as computed. False for a
    nan bound (nan weights or x), which the exact bound then judges."""
    if bound is None or tensor.dtype not in (torch.float32, torch.float64) \
            or not reads_freely(tensor):
        return False
    found = bound()
    return found is not None and found <= limit / CHEAP_BOUND_MARGIN


def _product(scale: float, bounds: Bounds | None) -> float | None:
    """scale * q's bound * k's bound: a bound of every logit."""
    return None if bounds is None else scale * bounds[0] * bounds[1]


def _largest(bounds: Bounds | None) -> float | None:
    """The larger bound; nan when either is (max() would drop a nan in second place)."""
    if bounds is None:
        return None
    return math.nan if math.isnan(bounds[0]) or math.isnan(bounds[1]) else max(bounds)


_refusing: ContextVar[bool] = ContextVar("robust_attn_overflow_refusal", default=True)


@contextmanager
def overflow_refusal(enabled: bool) -> Iterator[None]:
    """Context manager: the overflow refusals (this module) on or off inside the block, in this
    thread (or asyncio task) only. Off, a finite x whose logits overflow is not refused: its
    output may be nan, or finite and wrong (SDPA's zeros; the module docstring's measurements)."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    token = _refusing.set(enabled)
    try:
        yield
    finally:
        _refusing.reset(token)


def reads_freely(tensor: Tensor) -> bool:
    """Whether reading ``tensor``'s value on the host costs nothing: on the CPU, outside
    torch.compile and torch.export (where it would break the graph)."""
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def refuse_unless_within(exceeded: Tensor, x: Tensor, message: str) -> None:
    """RuntimeError(``message``) when the 0-dim bool ``exceeded`` is True and x is finite
    (:func:`all_finite`): asynchronously (robust_attn._compat.assert_async), except where
    :func:`reads_freely` allows reading ``exceeded`` first, so that x's finiteness pass runs only
    when the limit is exceeded."""
    if reads_freely(exceeded) and not bool(exceeded):
        return
    assert_async(~exceeded | ~all_finite(x), message)


# Formatted once: under torch.compile(dynamic=True) a float limit may be symbolic, and a symbolic
# float cannot be formatted inside the graph.
_LIMIT_TEXT = {True: f"{FLOAT16_LOGIT_LIMIT:.3g}", False: f"{LOGIT_LIMIT:.3g}"}
_NORM_INPUT_LIMIT_TEXT = f"{NORM_INPUT_LIMIT:.3g}"


def refuse_overflowing_logits(q: Tensor, k: Tensor, scale: float, x: Tensor,
                              row_norms: Callable[[], Bounds | None] | None = None) -> None:
    """RuntimeError (:func:`refuse_unless_within`) naming x when x is finite and
    :func:`logit_bound` exceeds :func:`logit_limit` for the dtype the logits are computed in.
    ``row_norms``: cheap upper bounds of q's and k's row norms (:func:`row_norm_bounds`),
    tried first where they apply (module docstring)."""
    if not _refusing.get():
        return
    dtype = logits_dtype(q.dtype, q.device.type)
    if dtype == q.dtype and _within_cheaply(
            q, row_norms and (lambda: _product(scale, row_norms())), logit_limit(dtype)):
        return
    refuse_unless_within(
        logit_bound(q, k, scale) > logit_limit(dtype), x,
        f"x: the attention logits are too large: their bound scale * max ||q_i|| * max ||k_j|| "
        f"exceeds {_LIMIT_TEXT[dtype == torch.float16]} (or is inf) for {dtype} logits, beyond "
        f"which logits overflow or hold no correct digit; x or the q/k weights are too large. To "
        f"fix it, {_NORMALISE}, use qk_norm=True, or, {_IF_DIVERGED}.")


def refuse_overflowing_norm_input(q: Tensor, k: Tensor, x: Tensor,
                                  row_norms: Callable[[], Bounds | None] | None = None) -> None:
    """RuntimeError (:func:`refuse_unless_within`) naming x when x is finite and a row of q or k,
    before its normalisation, has a norm above NORM_INPUT_LIMIT (the normalisation's squares
    would overflow). ``row_norms``: cheap upper bounds of those norms
    (:func:`projected_row_norm_bounds`), tried first where they apply (module docstring)."""
    if not _refusing.get():
        return
    if _within_cheaply(q, row_norms and (lambda: _largest(row_norms())), NORM_INPUT_LIMIT):
        return
    largest = torch.maximum(largest_row_norm(q), largest_row_norm(k))
    refuse_unless_within(
        largest > NORM_INPUT_LIMIT, x,
        f"x: q or k is too large for qk_norm: a row's norm exceeds {_NORM_INPUT_LIMIT_TEXT} (or is "
        f"inf), whose squares overflow float32, so the normalised q, k would be nan; x or the qkv "
        f"weights are too large. To fix it, {_NORMALISE} or, {_IF_DIVERGED}.")

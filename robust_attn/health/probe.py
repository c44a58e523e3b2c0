"""The health probe: attention health recomputed from a module's own q and k, on any kernel.

When the probe is on, or an observer asks for health
(:meth:`RobustAttention.register_observer`), RobustAttention hands it the
AttentionProblem it just solved (q and k after every mitigation, the masks, the score modifiers) and
the kernel's output. Under no_grad the probe recomputes the attention weights
for a bounded subsample of query rows with the eager reference
(:func:`robust_attn.kernels.eager.attention_logits`), so it measures exactly
what the fused kernel computed, and leaves outputs, gradients and the random
number generator untouched. Off, it costs one attribute check.

Sampling: at most ``max_queries`` query rows per head in all. Sequences longer
than that contribute ``max_queries`` evenly spaced rows of the first batch item;
shorter ones contribute every row of as many batch items as fit.

A switch for all modules (:func:`set_probe_enabled`, :func:`health_probe`) and
one per module (``RobustAttention(probe=True/False)``; None follows the global
switch).

Threads: :func:`set_probe_enabled` sets the process-wide default; a
:func:`health_probe` block sets the switch in its own thread (a
``contextvars.ContextVar``, so asyncio tasks are separate too) and restores it on
exit, however blocks of several threads interleave. A module run in another
thread (nn.DataParallel's replicas, a server's workers) follows that thread's
switch: the default unless it is inside a block of its own. (A process-wide
switch saved and restored by each block was left on, or off, by two threads
whose blocks overlapped.)
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .. import metrics
from ..kernels.eager import attention_logits
from ..problem import AttentionProblem

DEFAULT_MAX_QUERIES = 256
_enabled_everywhere = False  # the process-wide default
_enabled_here: contextvars.ContextVar[bool | None] = contextvars.ContextVar(
    "robust_attn_probe_enabled", default=None)  # a health_probe block's setting, None outside


def set_probe_enabled(enabled: bool) -> None:
    """Turn the probe on or off for every module whose own switch is None: the process-wide
    default or, called inside a :func:`health_probe` block, the block's setting until it ends."""
    global _enabled_everywhere
    if _enabled_here.get() is None:
        _enabled_everywhere = bool(enabled)
    else:
        _enabled_here.set(bool(enabled))


def probe_enabled_everywhere() -> bool:
    """The switch modules whose own is None follow, in the calling thread."""
    here = _enabled_here.get()
    return _enabled_everywhere if here is None else here


@contextmanager
def health_probe(enabled: bool = True) -> Iterator[None]:
    """Context manager: the probe switch set to ``enabled`` inside the block, in this thread
    (or asyncio task) only; other threads keep theirs (module docstring)."""
    token = _enabled_here.set(bool(enabled))
    try:
        yield
    finally:
        _enabled_here.reset(token)


@dataclass(frozen=True)
class AttentionMap:
    """Sampled attention weights (B', H, Nq', Nk) of one call and where keys were allowed (bool):
    exactly the rows and batch items the probe measured."""

    weights: Tensor
    allowed: Tensor


@dataclass
class AttentionHealth:
    """One module's health at its latest forward. Per-head tensors have shape (H,).

    entropy: mean normalised attention entropy (1 = uniform over the allowed keys); for a
        normalizer other than softmax (sigmoid), of each row divided by its sum.
    min_entropy: the lowest normalised entropy of any sampled query row.
    sink_mass: mean attention on the first key.
    sparsity: share of allowed weights below a tenth of uniform.
    max_logit: largest allowed pre-softmax logit (after score modifiers).
    residual: res(X) of each head's output tokens (0 = all tokens identical).
    cosine: mean pairwise cosine similarity of each head's output tokens.
    spectral_gap: sigma_1 - sigma_2 of the attention matrix, when asked for
        (``spectral=True``: a batched SVD, the probe's costliest part) and every
        query row was sampled; else None.
    empty_queries: sampled query rows with no allowed key (their output is zero).
    nonfinite: count of non-finite values in q, k, v and the output (all rows).
    sampled_queries: query rows per head that the figures above come from.
    extras: each mitigation's own quantities, keyed "option.name".
    """

    entropy: Tensor
    min_entropy: Tensor
    sink_mass: Tensor
    sparsity: Tensor
    max_logit: Tensor
    residual: Tensor
    cosine: Tensor
    spectral_gap: Tensor | None
    empty_queries: Tensor
    nonfinite: dict[str, Tensor]
    sampled_queries: int
    extras: dict[str, Tensor]

    def to_dict(self) -> dict[str, object]:
        """Plain Python numbers and lists, for any logger or JSON."""

        def plain(value):
            if isinstance(value, Tensor):
                return value.tolist()
            if isinstance(value, dict):
                return {key: plain(item) for key, item in value.items()}
            return value

        return {field.name: plain(getattr(self, field.name)) for field in fields(self)}


def _sample(problem: AttentionProblem, out: Tensor, max_queries: int):
    """The first batch items and evenly spaced query rows, at most max_queries rows per head."""
    batch, num_queries = problem.q.shape[0], problem.num_queries
    rows = min(num_queries, max_queries)
    items = max(1, min(batch, max_queries // rows))
    query_index = None if rows == num_queries else \
        torch.linspace(0, num_queries - 1, rows, device=problem.q.device).round().long()
    mask = problem.attn_mask
    if mask is not None and mask.dim() == 4:  # (B|1, H|1, Nq, Nk); fewer dims have no batch
        mask = mask[:items]
    sub = problem.with_(q=problem.q[:items], k=problem.k[:items], v=problem.v[:items],
                        attn_mask=mask)
    return sub, query_index, out[:items]


def _per_head(values: Tensor) -> Tensor:
    """Mean over every leading dim except heads: (B, H, ...) -> (H,)."""
    return values.flatten(2).mean(dim=(0, 2)) if values.dim() > 2 else values.mean(dim=0)


def _spectral_gap(weights: Tensor) -> Tensor:
    """Per-head gap; nan when the weights are not finite (the nonfinite counts say why).

    One path, eager or compiled: no data-dependent branch in a graph, and no host sync of
    our own (a Python ``if`` on ``isfinite(...).all()`` waits for the device); the nan
    comes out on the weights' device and in the gap's dtype. Non-finite weights are
    zeroed before the SVD, which rejects them, and their gap replaced by nan.
    ``torch.linalg.svdvals`` itself still synchronises a CUDA device with the CPU
    (torch.linalg.svd's documentation), so the gap stays opt-in (``spectral=True``)."""
    finite = torch.isfinite(weights).all()
    gap = _per_head(metrics.attention_spectral_gap(weights.nan_to_num(0.0, 0.0, 0.0)))
    return torch.where(finite, gap, torch.nan)


def count_nonfinite(tensor: Tensor) -> Tensor:
    """Exact count of non-finite values. nan and inf propagate through a sum, so a finite sum
    proves there are none: one reduction instead of an elementwise pass, in the common case."""
    if torch.compiler.is_compiling():  # no data-dependent branch in a graph (inductor fuses it)
        return (~torch.isfinite(tensor)).sum()
    if torch.isfinite(tensor.sum(dtype=torch.float32)):
        return torch.zeros((), dtype=torch.long, device=tensor.device)
    return (~torch.isfinite(tensor)).sum()


@torch.no_grad()
def measure(problem: AttentionProblem, out: Tensor, extras: dict[str, Tensor],
            max_queries: int = DEFAULT_MAX_QUERIES, spectral: bool = False,
            keep_map: bool = False) -> tuple[AttentionHealth, AttentionMap | None]:
    """Health of one attention call from its problem and its output (B, H, Nq, Dv), and, when
    ``keep_map``, the sampled attention map it was measured on (else None)."""
    sub, query_index, sub_out = _sample(problem, out, max_queries)
    logits = attention_logits(sub, query_index).float()
    allowed = ~torch.isneginf(logits)  # nan logits stay 'allowed', so their nan shows
    weights = sub.normalize(logits)
    # Rows of sigmoid attention are not distributions: judge where each row puts its weight.
    shares = weights if sub.is_softmax else weights / weights.sum(dim=-1, keepdim=True)
    entropy = metrics.attention_entropy(shares, allowed)
    health = AttentionHealth(
        entropy=_per_head(entropy),
        min_entropy=entropy.transpose(0, 1).flatten(1).amin(dim=1),
        sink_mass=_per_head(metrics.sink_mass(weights)),
        sparsity=_per_head(metrics.attention_sparsity(weights, allowed)),
        max_logit=metrics.max_attention_logit(logits, allowed).amax(dim=0),
        residual=_per_head(metrics.token_residual(sub_out.float())),
        cosine=_per_head(metrics.token_cosine_similarity(sub_out.float())),
        spectral_gap=_spectral_gap(weights) if spectral and query_index is None else None,
        empty_queries=(~allowed.any(dim=-1)).sum(),
        nonfinite={name: count_nonfinite(t) for name, t in
                   (("q", problem.q), ("k", problem.k), ("v", problem.v), ("output", out))},
        sampled_queries=weights.shape[0] * weights.shape[2],
        extras=extras,
    )
    return health, AttentionMap(weights, allowed) if keep_map else None

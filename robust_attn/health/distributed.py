"""Health across torch.distributed ranks: readings reduced by kind, and a whole AttentionHealth.

:func:`all_reduce` reduces named readings, each by its kind:

    "sum"    summed over the ranks (counts)
    "mean"   summed, then divided by the world size
    "max"    the largest over the ranks
    "min"    the smallest over the ranks

in two collectives whatever their number: "sum" and "mean" readings in one SUM
all_reduce, "max" and "min" readings (the latter negated) in one MAX all_reduce,
packed into float64 vectors (exact for counts up to 2^53). Every rank must call
it with readings of the same names and shapes (a collective), on the process
group's device (CPU for gloo, CUDA for NCCL). Without an initialised default
process group the readings come back unchanged, so single-process code needs no
branch.

:func:`reduce_health` applies these rules to an
:class:`~robust_attn.health.probe.AttentionHealth`, field by field:

    entropy, sink_mass, sparsity   mean over every rank's sampled query rows: each rank's
                                   value weighted by its sampled_queries. When each rank's
                                   probe samples all its rows, this is what one process
                                   measures on the concatenated batch.
    residual, cosine               weighted the same way; these are means over sampled batch
                                   items, so the same holds when the ranks' sequences have
                                   equal lengths.
    spectral_gap                   weighted mean over the ranks that measured it; None when
                                   none did.
    min_entropy                    min (the worst row anywhere)
    max_logit                      max
    empty_queries, nonfinite,      sum (counts over the global batch)
    sampled_queries
    extras                         mean over the ranks, except the quantities a mitigation
                                   names in its ``health_reductions`` (sigma_reparam's
                                   entropy_bound: min). Quantities of parameters (sigma,
                                   gamma, a sink logit) are equal on every rank under DDP
                                   and FSDP, so their mean is their value.

:func:`forward_together` runs a training step's forward on every rank and makes
the ranks agree on its outcome before any backward: where RobustAttention refuses
an overflowing step on one rank (``RuntimeError("x: ...")``, robust_attn.logit_limit)
every rank gets None and skips the step, and where a rank fails otherwise every
rank raises at once. Catching the refusal per rank instead (as a single-process
loop does) lets the other ranks go on to the backward pass, whose DDP all-reduces
then pair with the next step's on the refusing rank (gradients of different steps
averaged) until the group hangs; with ``broadcast_buffers`` (sigma_reparam's u, v)
it hangs at the next forward.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from ..mitigations import MITIGATIONS
from .probe import AttentionHealth

T = TypeVar("T")
REDUCTION_KINDS = ("sum", "mean", "max", "min")
_OK, _REFUSED, _FAILED = 0.0, 1.0, 2.0  # a rank's step outcome; the group takes the largest
WEIGHTED_HEALTH = ("entropy", "sink_mass", "sparsity", "residual", "cosine")


def pack(tensors: list[Tensor], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """The tensors flattened into one vector of ``dtype`` on ``device``."""
    if not tensors:
        return torch.zeros(0, device=device, dtype=dtype)
    return torch.cat([t.detach().reshape(-1).to(device=device, dtype=dtype) for t in tensors])


def unpack(flat: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Inverse of :func:`pack`: views of ``flat`` with the shapes of ``like``."""
    sizes = [t.numel() for t in like]
    return [part.view(t.shape) for part, t in zip(flat.split(sizes), like, strict=True)]


def ranks_to_reduce() -> bool:
    """True when torch.distributed is available and its default group is initialised."""
    return dist.is_available() and dist.is_initialized()


def all_reduce(readings: dict[Hashable, Tensor], kind: Callable[[Hashable], str],
               device: torch.device | None = None, group=None) -> dict[Hashable, Tensor]:
    """Every reading reduced over the ranks of ``group`` (None: the default group) by its kind.

    Readings come back in their own dtypes, on ``device`` (default: the first reading's).
    """
    kinds = {key: kind(key) for key in readings}
    unknown = sorted(str(key) for key, name in kinds.items() if name not in REDUCTION_KINDS)
    if unknown:
        raise ValueError(f"readings {unknown} have no reduction kind among {REDUCTION_KINDS}")
    if not ranks_to_reduce():
        return readings
    if device is None:
        device = next(iter(readings.values())).device if readings else torch.device("cpu")
    additive = [key for key in readings if kinds[key] in ("sum", "mean")]
    extreme = [key for key in readings if kinds[key] in ("max", "min")]
    totals = pack([readings[key] for key in additive], device, torch.float64)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM, group=group)
    signed = pack([readings[key] if kinds[key] == "max" else -readings[key] for key in extreme],
                  device, torch.float64)
    dist.all_reduce(signed, op=dist.ReduceOp.MAX, group=group)
    world = dist.get_world_size(group)
    reduced = {}
    for key, value in zip(additive, unpack(totals, [readings[k] for k in additive]), strict=True):
        reduced[key] = value / world if kinds[key] == "mean" else value
    for key, value in zip(extreme, unpack(signed, [readings[k] for k in extreme]), strict=True):
        reduced[key] = value if kinds[key] == "max" else -value
    return {key: reduced[key].to(readings[key].dtype) for key in readings}


def _extra_kind(name: str) -> str:
    """An extras key "option.quantity": the mitigation's declared reduction, else "mean"."""
    option, _, quantity = name.partition(".")
    mitigation = MITIGATIONS.get(option)
    return "mean" if mitigation is None else mitigation.health_reductions.get(quantity, "mean")


def reduce_health(health: AttentionHealth, group=None) -> AttentionHealth:
    """``health`` reduced over the ranks of ``group`` by the rules in the module docstring.

    A collective: every rank calls it with the health of the same module (the same
    configuration). Without an initialised default process group, ``health`` itself.
    """
    if not ranks_to_reduce():
        return health
    rows = torch.tensor(float(health.sampled_queries), device=health.entropy.device)
    gap = health.spectral_gap
    readings = {("rows", ""): rows,
                ("gap_rows", ""): rows if gap is not None else torch.zeros_like(rows),
                ("gap", ""): rows * gap if gap is not None else torch.zeros_like(health.entropy),
                ("min_entropy", ""): health.min_entropy, ("max_logit", ""): health.max_logit,
                ("empty_queries", ""): health.empty_queries}
    readings.update({(field, ""): rows * getattr(health, field) for field in WEIGHTED_HEALTH})
    readings.update({("nonfinite", name): count for name, count in health.nonfinite.items()})
    readings.update({("extras", name): value for name, value in health.extras.items()})
    kinds = {"min_entropy": "min", "max_logit": "max"}

    def kind(key: tuple[str, str]) -> str:
        field, name = key
        return _extra_kind(name) if field == "extras" else kinds.get(field, "sum")

    total = all_reduce(readings, kind, group=group)
    rows, gap_rows = total[("rows", "")], total[("gap_rows", "")]
    return AttentionHealth(
        **{field: total[(field, "")] / rows for field in WEIGHTED_HEALTH},
        min_entropy=total[("min_entropy", "")], max_logit=total[("max_logit", "")],
        spectral_gap=total[("gap", "")] / gap_rows if gap_rows > 0 else None,
        empty_queries=total[("empty_queries", "")],
        nonfinite={name: total[("nonfinite", name)] for name in health.nonfinite},
        sampled_queries=int(rows.item()),
        extras={name: total[("extras", name)] for name in health.extras},
    )


def _group_device(group) -> torch.device:
    """Where the group's collectives take tensors: the current CUDA device for NCCL, else the CPU."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class StepFailedElsewhere(RuntimeError):
    """Raised by :func:`forward_together` on the ranks whose step went well when another failed."""


def forward_together(forward: Callable[[], T], group=None) -> T | None:
    """``forward()`` (a step's forward pass and loss), with every rank agreeing on its outcome.

    Returns ``forward()``'s result on every rank when it succeeded everywhere; None on every
    rank when RobustAttention refused the step on some rank (a RuntimeError whose message
    starts with "x:", robust_attn.logit_limit): skip the backward pass and the optimizer step
    then, on every rank, and the process group stays in step (the recipes count such a step as
    refused, or the run as diverged). Any other exception is re-raised on its rank and every
    other rank raises :class:`StepFailedElsewhere` at once, instead of hanging in the next
    collective. One all_reduce of one float per call (a host synchronisation); a collective, so
    every rank of ``group`` must call it at every step. Without an initialised process group it
    is a plain call that returns None for a refusal.
    """
    outcome, result, error = _OK, None, None
    try:
        result = forward()
    except RuntimeError as caught:
        if str(caught).startswith("x:"):
            outcome = _REFUSED
        else:
            outcome, error = _FAILED, caught
    except Exception as caught:  # noqa: BLE001 - re-raised below, after telling the other ranks
        outcome, error = _FAILED, caught
    if ranks_to_reduce():
        flag = torch.tensor([outcome], dtype=torch.float32, device=_group_device(group))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        agreed = float(flag.item())
    else:
        agreed = outcome
    if error is not None:
        raise error
    if agreed == _FAILED:
        raise StepFailedElsewhere("forward_together: the step raised on another rank (see that "
                                  "rank's traceback); stopping this rank too")
    return None if agreed == _REFUSED else result

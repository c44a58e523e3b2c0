"""What a sparsity pattern is: a FlexAttention ``mask_mod`` per sequence length, composable with & and |.

A pattern says which keys each query may attend. For N tokens it gives a
mask_mod in FlexAttention's style (torch/nn/attention/flex_attention.py)::

    mask_mod(b, h, q_idx, kv_idx) -> bool tensor     (True = query q_idx may attend key kv_idx)

evaluated on broadcastable integer index tensors (or 0-dim ones under
FlexAttention's vmap), so one definition serves the eager reference, the
structured kernels and FlexAttention. Patterns are the same for every batch
item and head, and are values (frozen dataclasses: hashable, comparable,
picklable), so kernels can cache what they build from them.

Patterns compose: ``a & b`` allows a pair when both allow it, ``a | b`` when
either does (as FlexAttention's ``and_masks`` / ``or_masks``).

Alignment with an AttentionProblem: the pattern covers the Nq tokens; when a
mitigation prepends keys (sink tokens, a zero key; Nk > Nq), key j is token
j - (Nk - Nq) and the prepended keys stay visible to every query, as with the
lower-right aligned causal mask (see :mod:`robust_attn.problem`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from .._compat import assume_constant_result

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
KeyRanges = Tensor
"""(len(rows), S, 2) int64: S ranges [start, stop) of key tokens per query row (empty where
start >= stop; bounds may lie outside [0, N)), see :meth:`Pattern.key_ranges`."""

# Elements evaluated at once when a mask is materialised (bounds the temporary index grids).
_EVAL_ELEMENTS = 1 << 20


def and_masks(*mask_mods: MaskMod) -> MaskMod:
    """The mask_mod allowing a pair when every one of ``mask_mods`` does: FlexAttention's
    ``and_masks``, written here because importing torch.nn.attention.flex_attention loads
    dynamo (about 0.9 s at ``import robust_attn``)."""
    def and_mask(b, h, q_idx, kv_idx):
        result = mask_mods[0](b, h, q_idx, kv_idx)
        for mask_mod in mask_mods[1:]:
            result = result & mask_mod(b, h, q_idx, kv_idx)
        return result

    return and_mask


def or_masks(*mask_mods: MaskMod) -> MaskMod:
    """The mask_mod allowing a pair when any of ``mask_mods`` does (FlexAttention's ``or_masks``;
    see :func:`and_masks`)."""
    def or_mask(b, h, q_idx, kv_idx):
        result = mask_mods[0](b, h, q_idx, kv_idx)
        for mask_mod in mask_mods[1:]:
            result = result | mask_mod(b, h, q_idx, kv_idx)
        return result

    return or_mask


def key_range(start: Tensor, stop: Tensor) -> KeyRanges:
    """One range [start, stop) per row (``start`` and ``stop`` of shape (rows,)) as KeyRanges."""
    return torch.stack([start, stop], dim=-1)[:, None]


def intersect_ranges(a: KeyRanges, b: KeyRanges) -> KeyRanges:
    """The ranges holding the keys in both ``a`` and ``b``: every pair's overlap, (rows, Sa * Sb, 2)."""
    start = torch.maximum(a[:, :, None, 0], b[:, None, :, 0])
    stop = torch.minimum(a[:, :, None, 1], b[:, None, :, 1])
    return torch.stack([start, stop], dim=-1).flatten(1, 2)


def evaluate_chunks(mask_mod: MaskMod, rows: Tensor, keys: Tensor) -> Iterator[Tensor]:
    """mask_mod (b = h = 0) on index grids ``rows`` and ``keys`` broadcast together, as bool
    tensors of the broadcast shape, a few slices of its first dimension at a time (in one piece
    under torch.compile, whose graph holds the whole grid anyway: a loop over a symbolic
    length would specialise the graph to that length)."""
    zero = rows.new_zeros(())
    shape = torch.broadcast_shapes(rows.shape, keys.shape)
    if torch.compiler.is_compiling():
        yield mask_mod(zero, zero, rows, keys).expand(shape)
        return
    step = max(1, _EVAL_ELEMENTS // max(1, math.prod(shape[1:])))

    def part(t: Tensor, start: int) -> Tensor:
        return t if t.shape[0] == 1 else t[start:start + step]

    for start in range(0, max(1, shape[0]), step):
        yield mask_mod(zero, zero, part(rows, start), part(keys, start)).expand(
            min(step, shape[0] - start), *shape[1:])


def evaluate(mask_mod: MaskMod, rows: Tensor, keys: Tensor) -> Tensor:
    """:func:`evaluate_chunks`, concatenated."""
    return torch.cat(list(evaluate_chunks(mask_mod, rows, keys)))


@assume_constant_result
def describe(pattern: Pattern) -> str:
    """``repr(pattern)``, for messages; a constant under torch.compile (dynamo would otherwise
    trace the dataclass repr, which calls _thread.get_ident, and warn that it cannot)."""
    return repr(pattern)


def check_positive(name: str, value: object) -> int:
    """``value`` as an int >= 1, else ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: expected an integer >= 1")
    return value


def check_tokens(num_tokens: object) -> int:
    return check_positive("num_tokens", num_tokens)


class Pattern:
    """Base of every sparsity pattern. Subclasses are frozen dataclasses that define
    :meth:`mask_mod` and ``source`` (the paper the pattern comes from)."""

    source: ClassVar[str] = ""

    def mask_mod(self, num_tokens: int) -> MaskMod:
        """The FlexAttention mask_mod of this pattern over ``num_tokens`` tokens."""
        raise NotImplementedError

    def global_keys(self, num_tokens: int) -> frozenset[int]:
        """Keys that many queries far apart may attend (global tokens, summary columns).

        Only a hint for the block-sparse kernel, which gathers these keys for
        every query block instead of their whole key blocks; it never changes
        what is allowed."""
        return frozenset()

    def key_ranges(self, num_tokens: int, rows: Tensor) -> KeyRanges | None:
        """For each query token in ``rows`` (int64, 1-D), ranges of key tokens holding every key it
        may attend other than :meth:`global_keys` (a bound: a range may hold keys the pattern
        blocks), or None: no bound narrower than every key.

        Only a hint for the block-sparse kernel, which evaluates the pattern on the blocks
        these ranges touch instead of on all N x N pairs; it never changes what is allowed,
        but a range that misses an allowed key would make that kernel drop it
        (tests/test_sparse_kernels.py checks every pattern's ranges against its mask)."""
        return None

    def __and__(self, other: Pattern) -> Pattern:
        return AllOf(_parts(self, AllOf) + _parts(_checked(other, "&"), AllOf))

    def __or__(self, other: Pattern) -> Pattern:
        return AnyOf(_parts(self, AnyOf) + _parts(_checked(other, "|"), AnyOf))

    def problem_mask_mod(self, num_queries: int, num_keys: int) -> MaskMod:
        """The mask_mod over a problem's keys: the last Nq keys are the tokens, and the
        Nk - Nq keys before them (prepended by mitigations) are visible to every query."""
        if num_keys < num_queries:
            raise ValueError(f"num_keys={num_keys} < num_queries={num_queries}: a pattern "
                             "needs every query token among the keys")
        inner = self.mask_mod(num_queries)
        offset = num_keys - num_queries
        if offset == 0:
            return inner

        def mask_mod(b, h, q_idx, kv_idx):
            return (kv_idx < offset) | inner(b, h, q_idx, (kv_idx - offset).clamp_min(0))

        return mask_mod

    def allowed(self, rows: Tensor, keys: Tensor, num_queries: int, num_keys: int | None = None
                ) -> Tensor:
        """Bool (len(rows), len(keys)): may query ``rows[i]`` attend key ``keys[j]`` (keys
        aligned as in :meth:`problem_mask_mod`; num_keys defaults to num_queries)."""
        mask_mod = self.problem_mask_mod(num_queries, num_keys or num_queries)
        return evaluate(mask_mod, rows[:, None], keys[None, :])

    def dense(self, num_tokens: int, device: torch.device | str | None = None) -> Tensor:
        """Bool (N, N): the whole pattern over ``num_tokens`` tokens."""
        index = torch.arange(check_tokens(num_tokens), device=device)
        return self.allowed(index, index, num_tokens)

    def density(self, num_tokens: int) -> float:
        """Share of the N x N (query, key) pairs the pattern allows."""
        index = torch.arange(check_tokens(num_tokens))
        chunks = evaluate_chunks(self.mask_mod(num_tokens), index[:, None], index[None, :])
        return sum(int(chunk.sum()) for chunk in chunks) / num_tokens**2


def _checked(other: object, operator: str) -> Pattern:
    if not isinstance(other, Pattern):
        raise TypeError(f"a pattern can only be combined with {operator} with another pattern, "
                        f"got {type(other).__name__}")
    return other


def _parts(pattern: Pattern, kind: type) -> tuple[Pattern, ...]:
    return pattern.parts if isinstance(pattern, kind) else (pattern,)


@dataclass(frozen=True)
class AllOf(Pattern):
    """Intersection ``a & b & ...``: a pair is allowed when every part allows it."""

    parts: tuple[Pattern, ...]

    def mask_mod(self, num_tokens: int) -> MaskMod:
        return and_masks(*(part.mask_mod(num_tokens) for part in self.parts))

    def global_keys(self, num_tokens: int) -> frozenset[int]:
        # Any part's global keys cover the intersection's pairs in those columns.
        return frozenset().union(*(part.global_keys(num_tokens) for part in self.parts))

    def key_ranges(self, num_tokens: int, rows: Tensor) -> KeyRanges | None:
        # An allowed key outside the union of global keys is inside every part's ranges.
        ranges = None
        for part in self.parts:
            bound = part.key_ranges(num_tokens, rows)
            ranges = bound if ranges is None or bound is None else intersect_ranges(ranges, bound)
        return ranges


@dataclass(frozen=True)
class AnyOf(Pattern):
    """Union ``a | b | ...``: a pair is allowed when some part allows it."""

    parts: tuple[Pattern, ...]

    def mask_mod(self, num_tokens: int) -> MaskMod:
        return or_masks(*(part.mask_mod(num_tokens) for part in self.parts))

    def global_keys(self, num_tokens: int) -> frozenset[int]:
        return frozenset().union(*(part.global_keys(num_tokens) for part in self.parts))

    def key_ranges(self, num_tokens: int, rows: Tensor) -> KeyRanges | None:
        # An allowed key outside the union of global keys is in some part's ranges.
        bounds = [part.key_ranges(num_tokens, rows) for part in self.parts]
        return None if any(bound is None for bound in bounds) else torch.cat(bounds, dim=1)


@dataclass(frozen=True)
class Causal(Pattern):
    """Causal: query i attends key j when j <= i (autoregressive models)."""

    source: ClassVar[str] = "Vaswani et al. 2017, 'Attention Is All You Need' (decoder masking)"

    def mask_mod(self, num_tokens: int) -> MaskMod:
        check_tokens(num_tokens)

        def causal(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx

        return causal

    def key_ranges(self, num_tokens: int, rows: Tensor) -> KeyRanges | None:
        return key_range(torch.zeros_like(rows), rows + 1)


def structural_mask_mod(pattern: Pattern | None, causal: bool, num_queries: int,
                        num_keys: int) -> MaskMod | None:
    """A problem's lower-right causal mask and its aligned pattern as one mask_mod (None: neither)."""
    mask_mods = [pattern.problem_mask_mod(num_queries, num_keys)] if pattern is not None else []
    if causal:
        offset = num_keys - num_queries

        def causal_mask(b, h, q_idx, kv_idx):
            return kv_idx <= q_idx + offset

        mask_mods.append(causal_mask)
    if not mask_mods:
        return None
    return mask_mods[0] if len(mask_mods) == 1 else and_masks(*mask_mods)


def split_causal(pattern: Pattern) -> tuple[Pattern, bool]:
    """``(core, causal)`` with ``pattern == core & Causal()`` when causal; for kernels that
    handle causality themselves."""
    if not isinstance(pattern, AllOf):
        return pattern, False
    rest = tuple(part for part in pattern.parts if not isinstance(part, Causal))
    if len(rest) == len(pattern.parts) or not rest:
        return pattern, False
    return (rest[0] if len(rest) == 1 else AllOf(rest)), True

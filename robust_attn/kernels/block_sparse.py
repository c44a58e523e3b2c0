"""Block-sparse attention by gathering each query block's keys (overlapping chunks, generalised).

Queries are cut into blocks of :func:`block_size` tokens (128 from N = 2048).
A layout, built from the exact pattern once per (pattern, causal, Nq, Nk,
block, device) and cached, says for each query block which keys it gathers:

- global keys: the pattern's hint (global tokens, Child et al.'s summary
  columns, prefix tokens) and keys prepended by mitigations, gathered for every
  query block;
- key blocks: the blocks holding any other allowed key. For a sliding window
  they are a contiguous span, so the query blocks attend overlapping chunks of
  keys; for random blocks, a scattered few;
- heavy query blocks, which need more than K key blocks (K chosen to minimise
  the scores computed; the global query tokens), attend every key with a dense
  mask row instead.

Each light query block then attends its L = G + K * block gathered keys in
one batched SDPA call, with a small (block, L) bool mask: the pattern there,
with padding and keys gathered twice blocked. Scores computed:
light blocks * block * L + heavy rows * Nk instead of Nq * Nk; memory is linear
in N for a fixed window (the gathered keys and values, and their gradients,
are N * L / block rows each). Building the layout evaluates the pattern on the
block pairs its :meth:`~robust_attn.sparse.Pattern.key_ranges` touch (every pair
for a pattern without them, such as Strided or AxialColumns, as FlexAttention's
create_block_mask does), in cache-sized pieces on int32 indices: at N = 16384 the
benchmark's patterns build layout and plan in a few tenths of a second on a 2-core CPU
(benchmarks/setup_costs.py), where every pair took up to 21 s. Every step is an
index_select, reshape or cat, so gradients flow (index_select's backward adds into the
gathered keys).

A query with no allowed key attends a placeholder key and its output is
multiplied by 0: zeros, with zero gradients, never nan.

torch.compile and torch.export: the layout holds Python ints only, so that
the data-dependent work (which blocks are needed, K) stays out of the traced
graph: :func:`block_sparse_layout` runs eagerly under tracing
(``assume_constant_result`` for dynamo, robust_attn._compat; outside the dispatch
modes for non-strict export) and the graph is specialised to its result, as
it is to the sequence length. The index tensors and masks are then built from
the layout with shape-static operations: traced into the graph when
compiling, cached per layout in eager mode (:func:`block_sparse_plan`).

torch.compile: a layout exists for one length only, and dynamo cannot tell a
symbolic length from a constant one inside the traced code, so under dynamo this
kernel refuses every problem and ``auto`` takes the next kernel (SDPA with the
pattern as a dense mask; FlexAttention's BlockMask on CUDA), whose graph holds
for every length. Specialising instead made dynamo compile one graph per length
and fail at its recompile limit (8) under ``fullgraph=True``, ``dynamic=True``
included. The price: a compiled module computes every score of the pattern on
the CPU (exact, not sparse); eager mode and ``torch.export`` (non-strict, one
length) keep this kernel.

The layout is built on the CPU when the problem lives on the ``meta`` device
(shape inference): it is Python ints, so the device only sets where the pattern is
evaluated.
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._compat import assume_constant_result, outside_tracing_modes
from ..problem import AttentionProblem
from ..sparse.pattern import MaskMod, Pattern, evaluate, key_range, structural_mask_mod
from .base import Kernel
from .structured import structured_unsupported

# auto uses this kernel only when its plan computes at most this share of the dense scores.
MAX_SHARE = 0.5
_NEEDS_ELEMENTS = 1 << 20  # pairs evaluated at once when finding a plan's key blocks (cache-sized)


@dataclass(frozen=True)
class BlockSparseLayout:
    """Which keys each query block gathers, in Python ints (a constant for torch.compile).

    Query block b holds queries b * block .. b * block + block - 1 (the last one cut at Nq);
    key block c likewise holds keys c * block ...
    """

    block: int
    num_queries: int
    num_keys: int
    global_keys: tuple[int, ...]  # gathered by every light block, sorted
    light_blocks: tuple[int, ...]  # query blocks attending gathered keys, sorted
    key_blocks: tuple[int, ...]  # (light blocks * K): the K key blocks each light block gathers
    num_key_blocks: int  # K
    heavy_blocks: tuple[int, ...]  # query blocks attending every key, sorted
    heavy_rows: int  # queries in heavy blocks
    light_rows_without_key: bool  # some light query has no allowed key
    heavy_rows_without_key: bool
    share: float  # scores computed, as a share of the dense Nq * Nk
    # Plain fields, no properties: dynamo reads a constant dataclass's fields only.


def _candidate_blocks(pattern: Pattern, causal: bool, num_queries: int, num_keys: int,
                      block: int, device: torch.device) -> Tensor:
    """(query blocks, key blocks) bool: the block pairs that may hold an allowed non-global key,
    from the pattern's :meth:`~robust_attn.sparse.Pattern.key_ranges` (every pair where it has
    none), intersected with the causal mask's, aligned to the keys."""
    rows = torch.arange(num_queries, device=device)
    offset = num_keys - num_queries
    ranges = pattern.key_ranges(num_queries, rows)
    if ranges is None:
        ranges = key_range(torch.zeros_like(rows), torch.full_like(rows, num_queries))
    start, stop = (ranges[..., 0] + offset).clamp_min(offset), (ranges[..., 1] + offset).clamp_max(num_keys)
    if causal:
        stop = torch.minimum(stop, rows[:, None] + offset + 1)
    # A difference array over key blocks: +1 where a range's first block is, -1 past its last.
    used = start < stop
    query_block = (rows // block)[:, None].expand_as(start)[used]
    first, past = start[used] // block, (stop[used] - 1) // block + 1
    key_blocks = -(-num_keys // block)
    steps = torch.zeros(-(-num_queries // block), key_blocks + 1, dtype=torch.int32, device=device)
    ones = torch.ones_like(first, dtype=torch.int32)
    steps.index_put_((query_block, first), ones, accumulate=True)
    steps.index_put_((query_block, past), -ones, accumulate=True)
    return steps.cumsum(dim=1)[:, :key_blocks] > 0


def _block_needs(mask_mod: MaskMod, candidates: Tensor, num_queries: int, num_keys: int,
                 is_global: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """(query blocks, key blocks) bool: does any query of the block attend a non-global key
    there; and (Nq,) bool: does the query attend any non-global key.

    Evaluates the mask on the pairs of the ``candidates`` block pairs only (elsewhere it
    allows no non-global key), a few at a time, on int32 indices (FlexAttention's index
    dtype; less memory traffic than int64)."""
    device = is_global.device
    pairs = torch.nonzero(candidates)
    offsets = torch.arange(block, device=device, dtype=torch.int32)
    needs = torch.zeros_like(candidates)
    attends = torch.zeros(candidates.shape[0] * block, dtype=torch.int32, device=device)
    step = max(1, _NEEDS_ELEMENTS // (block * block))
    for chunk in pairs.split(step):
        rows = chunk[:, :1].to(torch.int32) * block + offsets  # (pairs, block)
        keys = chunk[:, 1:].to(torch.int32) * block + offsets
        real_key = ~is_global[keys] & (keys < num_keys)
        allowed = evaluate(mask_mod, rows.clamp_max(num_queries - 1)[:, :, None],
                           keys.clamp_max(num_keys - 1)[:, None, :]) & real_key[:, None, :]
        row_attends = allowed.any(dim=2)
        needs[chunk[:, 0], chunk[:, 1]] = row_attends.any(dim=1)
        attends.index_add_(0, rows.flatten(), row_attends.flatten().to(torch.int32))
    return needs, attends[:num_queries] > 0


def _light_blocks_cost(counts: Tensor, light_keys: int, block: int, num_keys: int) -> list:
    """(scores, K) for each K a light block may gather: blocks needing more key blocks are heavy."""
    cost = []
    smallest = 1 if light_keys == 0 else 0  # every light block gathers at least one key
    for k in sorted(set(counts.tolist()) | {smallest}):
        k = max(k, smallest)
        light = int((counts <= k).sum())
        cost.append((light * block * (light_keys + k * block)
                     + (len(counts) - light) * block * num_keys, k))
    return cost


def _global_keys(pattern: Pattern, num_queries: int, num_keys: int) -> tuple[int, ...]:
    """The keys prepended by mitigations and the pattern's global keys (aligned to the keys)."""
    offset = num_keys - num_queries
    return tuple(sorted(set(range(offset)) | {offset + j for j in pattern.global_keys(num_queries)}))


def _is_global(global_keys: tuple[int, ...], num_keys: int, block: int,
               device: torch.device) -> Tensor:
    """(key blocks * block,) bool: is the key (or the padding past Nk) one of the global keys."""
    is_global = torch.zeros(-(-num_keys // block) * block, dtype=torch.bool, device=device)
    return is_global.index_fill(0, _index(global_keys, device), True)


def _index(values: tuple[int, ...], device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def _block_rows(blocks: Tensor, block: int) -> Tensor:
    """(len(blocks), block): the rows (queries or keys) of each block, past the end included."""
    return blocks[:, None] * block + torch.arange(block, device=blocks.device)


@functools.lru_cache(maxsize=32)
def _layout(pattern: Pattern, causal: bool, num_queries: int, num_keys: int, block: int,
            device: torch.device) -> BlockSparseLayout:
    mask_mod = structural_mask_mod(pattern, causal, num_queries, num_keys)
    global_keys = _global_keys(pattern, num_queries, num_keys)
    is_global = _is_global(global_keys, num_keys, block, device)
    candidates = _candidate_blocks(pattern, causal, num_queries, num_keys, block, device)
    needs, attends = _block_needs(mask_mod, candidates, num_queries, num_keys, is_global, block)
    counts = needs.sum(dim=1)
    _, k = min(_light_blocks_cost(counts, len(global_keys), block, num_keys))
    light_blocks = torch.nonzero(counts <= k).flatten()
    heavy_blocks = torch.nonzero(counts > k).flatten().tolist()
    # Each light block's key blocks: the needed ones first (a stable sort keeps them in order),
    # padded with unneeded ones, where the mask allows no key.
    key_blocks = needs[light_blocks].to(torch.int8).argsort(dim=1, descending=True, stable=True)
    # Only the last query block can be cut short, and it sorts last.
    heavy_rows = sum(min(block, num_queries - b * block) for b in heavy_blocks)
    # Which part has queries with no allowed key: known here, so the plan needs no
    # data-dependent branch. A light block gathers every key block it needs, so its queries,
    # like the heavy ones, see every key they may attend: a query has one if it may attend a
    # global key or a non-global one (``attends``).
    rows = torch.arange(num_queries, device=device)
    attends = attends | evaluate(mask_mod, rows[:, None], _index(global_keys, device)[None]).any(dim=1)
    is_light = torch.zeros_like(counts, dtype=torch.bool).index_fill(0, light_blocks, True)[rows // block]
    return BlockSparseLayout(
        block, num_queries, num_keys, global_keys, tuple(light_blocks.tolist()),
        tuple(key_blocks[:, :k].flatten().tolist()), k, tuple(heavy_blocks), heavy_rows,
        light_rows_without_key=not bool(attends[is_light].all()),
        heavy_rows_without_key=not bool(attends[~is_light].all()),
        share=(len(light_blocks) * block * (len(global_keys) + k * block) + heavy_rows * num_keys)
        / (num_queries * num_keys))


@assume_constant_result
def block_sparse_layout(pattern: Pattern, causal: bool, num_queries: int, num_keys: int,
                        block: int, device: torch.device) -> BlockSparseLayout:
    """The layout for a problem's pattern and lengths (cached: a new length builds a new one).

    Runs eagerly even while torch.compile or torch.export trace the caller: dynamo calls it
    with the constant arguments and takes the result as a constant; make_fx-based tracing
    (non-strict export) runs it outside its fake-tensor and proxy modes."""
    if device.type == "meta":  # no data on meta: evaluate the pattern on the CPU
        device = torch.device("cpu")
    with outside_tracing_modes():
        return _layout(pattern, causal, num_queries, num_keys, block, device)


# Query rows (R,), the keys each block of them gathers (blocks, L), allowed (blocks, R / blocks, L).
Rows = tuple[Tensor, Tensor, Tensor]


def _parts(layout: BlockSparseLayout, mask_mod: MaskMod, device: torch.device) -> tuple[Rows, Rows]:
    """The light and the heavy query rows, the keys they gather and the pattern there (blocked:
    padding past Nk, global keys gathered again in a key block), built from the layout with
    shape-static operations only (traceable)."""
    num_queries, num_keys, block = layout.num_queries, layout.num_keys, layout.block
    global_keys, num_light = _index(layout.global_keys, device), len(layout.light_blocks)
    positions = _block_rows(_index(layout.key_blocks, device), block).view(
        num_light, layout.num_key_blocks * block)
    keys = torch.cat([global_keys.expand(num_light, -1), positions.clamp_max(num_keys - 1)], dim=1)
    key_ok = torch.cat([torch.ones_like(keys[:, :len(global_keys)], dtype=torch.bool),
                        (positions < num_keys)
                        & ~_is_global(layout.global_keys, num_keys, block, device)[positions]], dim=1)
    rows = _block_rows(_index(layout.light_blocks, device), block).clamp_max(num_queries - 1)
    # The pattern on int32 indices, as in the layout: half the memory traffic of int64.
    light_allowed = evaluate(mask_mod, rows.int()[:, :, None], keys.int()[:, None, :]) & key_ok[:, None, :]

    heavy_rows = _block_rows(_index(layout.heavy_blocks, device), block).flatten()
    heavy_rows = heavy_rows[:layout.heavy_rows]
    all_keys = torch.arange(num_keys, device=device)
    heavy_allowed = evaluate(mask_mod, heavy_rows.int()[:, None], all_keys.int()[None])[None]
    return (rows.flatten(), keys, light_allowed), (heavy_rows, all_keys[None], heavy_allowed)


@dataclass(frozen=True)
class _Attend:
    """Some query rows attending gathered keys with a mask; ``keep`` zeroes rows with no key."""

    rows: Tensor  # (R,) query rows, R = blocks * block_rows
    keys: Tensor  # (blocks, L) key indices gathered for each block of rows
    mask: Tensor  # (blocks, block_rows, L) bool (SDPA's fused CPU kernel needs it 4D: mask[None])
    keep: Tensor | None  # (blocks, block_rows, 1): 0 for rows with no allowed key; None: all have

    @classmethod
    def build(cls, rows: Tensor, keys: Tensor, allowed: Tensor, rows_without_key: bool) -> _Attend:
        """Rows with no allowed key (``rows_without_key``, known from the layout: no
        data-dependent branch here) attend a placeholder key, the first, and are zeroed."""
        if not rows_without_key:
            return cls(rows, keys, allowed, None)
        has_key = allowed.any(dim=-1, keepdim=True)
        mask = torch.cat([allowed[..., :1] | ~has_key, allowed[..., 1:]], dim=-1)
        return cls(rows, keys, mask, has_key.to(torch.get_default_dtype()))

    def __call__(self, problem: AttentionProblem, dropout_p: float) -> Tensor:
        """(B, H, R, Dv)."""
        (batch, heads), blocks = problem.q.shape[:2], self.keys.shape[0]

        def gather(t: Tensor, index: Tensor) -> Tensor:
            return t.index_select(2, index.flatten()).flatten(0, 1).unflatten(1, (blocks, -1))

        out = F.scaled_dot_product_attention(
            gather(problem.q, self.rows), gather(problem.k, self.keys),
            gather(problem.v, self.keys), attn_mask=self.mask[None], dropout_p=dropout_p,
            scale=problem.scale,
        )
        if self.keep is not None:
            out = out * self.keep.to(out.dtype)
        return out.flatten(1, 2).unflatten(0, (batch, heads))


@dataclass(frozen=True)
class BlockSparsePlan:
    """Light query blocks gathering their keys, heavy rows attending all keys, and ``order``:
    where each query's output lies in cat(light outputs, heavy outputs)."""

    layout: BlockSparseLayout
    light: _Attend
    heavy: _Attend
    order: Tensor  # (Nq,)

    @property
    def share(self) -> float:
        """Scores computed, as a share of the dense Nq * Nk."""
        return self.layout.share


def build_plan(layout: BlockSparseLayout, pattern: Pattern, causal: bool,
               device: torch.device) -> BlockSparsePlan:
    """The plan's tensors from its layout (shape-static operations only: traceable)."""
    mask_mod = structural_mask_mod(pattern, causal, layout.num_queries, layout.num_keys)
    light, heavy = _parts(layout, mask_mod, device)
    # The light rows past Nq (clamped in light[0]) sort after every real row.
    light_rows = _block_rows(_index(layout.light_blocks, device), layout.block).flatten()
    order = torch.cat([light_rows, heavy[0]]).argsort()[:layout.num_queries]
    return BlockSparsePlan(layout, _Attend.build(*light, layout.light_rows_without_key),
                           _Attend.build(*heavy, layout.heavy_rows_without_key), order)


# Eager mode reuses the plan's tensors; traced code builds them in the graph instead.
cached_plan = functools.lru_cache(maxsize=32)(build_plan)


def block_size(num_queries: int) -> int:
    """Query block length: about N / 16, a power of two in [16, 128] (larger blocks use SDPA's
    fused CPU kernel better; smaller ones follow a short sequence's pattern more closely)."""
    return min(128, max(16, 2 ** round(math.log2(num_queries / 16))))


def _plan(layout: BlockSparseLayout, pattern: Pattern, causal: bool,
          device: torch.device) -> BlockSparsePlan:
    """Cached in eager mode; built in the graph when traced (torch.compile, torch.export), where
    a cache would hold the tracer's fake tensors."""
    build = build_plan if torch.compiler.is_compiling() else cached_plan
    return build(layout, pattern, causal, device)


def block_sparse_plan(pattern: Pattern, causal: bool, num_queries: int, num_keys: int,
                      device: torch.device, block: int) -> BlockSparsePlan:
    """The plan for a pattern and lengths (see :func:`_plan`)."""
    return _plan(block_sparse_layout(pattern, causal, num_queries, num_keys, block, device),
                 pattern, causal, device)


def _problem_layout(problem: AttentionProblem, block: int | None) -> BlockSparseLayout:
    # operator.index makes a symbolic length concrete (export with a static length).
    num_queries, num_keys = operator.index(problem.num_queries), operator.index(problem.num_keys)
    block = block_size(num_queries) if block is None else block
    return block_sparse_layout(problem.pattern, problem.causal, num_queries, num_keys, block,
                               problem.q.device)


def block_sparse_attention(problem: AttentionProblem, dropout_p: float = 0.0,
                           block: int | None = None) -> Tensor:
    plan = _plan(_problem_layout(problem, block), problem.pattern, problem.causal, problem.q.device)
    parts = [part(problem, dropout_p) for part in (plan.light, plan.heavy) if part.rows.numel()]
    return torch.cat(parts, dim=2).index_select(2, plan.order)


def _unsupported(problem: AttentionProblem, dropout_p: float) -> str | None:
    reason = structured_unsupported(problem)
    if reason is not None:
        return reason
    if torch.compiler.is_dynamo_compiling():
        return ("under torch.compile a block-sparse layout, built for one length, would "
                "specialise the graph to every sequence length")
    layout = _problem_layout(problem, None)
    if layout.share > MAX_SHARE:
        return (f"the pattern is dense at the block-sparse kernel's block size {layout.block}: "
                f"it would compute {layout.share:.0%} of the dense scores")
    return None


BLOCK_SPARSE = Kernel("block_sparse", block_sparse_attention, _unsupported)

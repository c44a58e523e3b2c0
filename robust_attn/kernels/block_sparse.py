"""Block-sparse attention: each query block attends its band of keys, the global keys and a few
gathered key blocks (overlapping chunks, generalised).

Queries are cut into blocks of :func:`block_size` tokens (128 from N = 2048; twice that
where it computes at most :data:`LARGER_BLOCK_SHARE` times the scores). A layout, built from
the exact pattern once per (pattern, causal, Nq, Nk, block, device) and cached, says for each
query block which keys it attends:

- global keys: the pattern's hint (global tokens, Child et al.'s summary
  columns, prefix tokens) and keys prepended by mitigations, for every query block;
- the band: the keys, at fixed offsets from the block's first query, that most
  query blocks use (a sliding window's span: keys b * block + band_start ..
  + band - 1, token-exact);
- key blocks: blocks of :func:`key_block_size` keys (64) holding any other allowed
  key, K per block (BigBird's random blocks, the part of a window outside the band);
- heavy query blocks, which need more than K key blocks (K chosen to minimise
  the scores computed), attend every key with a dense mask row instead; when few
  rows of such a block need more than the global keys and the band (Longformer's
  global queries), only those rows do, and the block stays light.

Each light query block attends its L = G + band + K * key_block keys with a small
(block, L) mask: the pattern there, with padding and keys seen twice blocked. The
band is a strided view of the padded keys (``unfold``, no copy; its backward sums the
overlapping windows' gradients) and consecutive light blocks a view of the queries,
so a banded pattern gathers nothing. On the CPU without dropout the three parts run as
separate fused SDPA calls merged by the rows' log-sum-exp
(:mod:`robust_attn.kernels.lse_merge`), so no key is copied to put them side by side;
otherwise they are concatenated for one call. Scores computed:
light blocks * block * L + heavy rows * Nk instead of Nq * Nk; memory is linear
in N for a fixed window (the bands' gradients and the gathered keys are N * L / block
rows each). Building the layout evaluates the pattern on the
block pairs its :meth:`~robust_attn.sparse.Pattern.key_ranges` touch (every pair
for a pattern without them, such as Strided or AxialColumns, as FlexAttention's
create_block_mask does), in cache-sized pieces on int32 indices: at N = 16384 the
benchmark's patterns build layout and plan in a few tenths of a second on a 2-core CPU
(benchmarks/setup_costs.py), where every pair took up to 21 s. Every step is a view,
an index_select, a reshape or a cat, or the merge's own backward, so gradients flow.

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
from .lse_merge import Part, merged_attention
from .structured import structured_unsupported

# auto uses this kernel only when its plan computes at most this share of the dense scores.
MAX_SHARE = 0.5
_NEEDS_ELEMENTS = 1 << 20  # pairs evaluated at once when finding a plan's key blocks (cache-sized)


@dataclass(frozen=True)
class BlockSparseLayout:
    """Which keys each query block gathers, in Python ints (a constant for torch.compile).

    Query block b holds queries b * block .. b * block + block - 1 (the last one cut at Nq);
    key block c holds keys c * key_block ... A light block b attends, in this order: the global
    keys; its band, the ``band`` keys from b * block + band_start on (keys outside [0, Nk) are
    padding); and its ``num_key_blocks`` key blocks in ``key_blocks``.
    """

    block: int
    key_block: int
    num_queries: int
    num_keys: int
    global_keys: tuple[int, ...]  # gathered by every light block, sorted
    light_blocks: tuple[int, ...]  # query blocks attending gathered keys, sorted
    band_start: int  # first band key of light block b: b * block + band_start
    band: int  # band length (0: no band)
    key_blocks: tuple[int, ...]  # (light blocks * K): the K key blocks each light block gathers
    num_key_blocks: int  # K
    heavy_rows: tuple[int, ...]  # queries attending every key, sorted (some may be in light
    # blocks too: their light outputs are dropped)
    light_rows_without_key: bool  # some light query has no allowed key
    heavy_rows_without_key: bool
    share: float  # scores computed, as a share of the dense Nq * Nk
    # Plain fields, no properties: dynamo reads a constant dataclass's fields only.


def _candidate_blocks(pattern: Pattern, causal: bool, num_queries: int, num_keys: int,
                      block: int, key_block: int, device: torch.device) -> Tensor:
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
    first, past = start[used] // key_block, (stop[used] - 1) // key_block + 1
    key_blocks = -(-num_keys // key_block)
    steps = torch.zeros(-(-num_queries // block), key_blocks + 1, dtype=torch.int32, device=device)
    ones = torch.ones_like(first, dtype=torch.int32)
    steps.index_put_((query_block, first), ones, accumulate=True)
    steps.index_put_((query_block, past), -ones, accumulate=True)
    return steps.cumsum(dim=1)[:, :key_blocks] > 0


def _keys_used(mask_mod: MaskMod, candidates: Tensor, num_queries: int, num_keys: int,
               is_global: Tensor, block: int, key_block: int) -> tuple[Tensor, Tensor]:
    """(query blocks, key blocks * key_block) bool: does any query of the block attend the
    non-global key; and (Nq,) bool: does the query attend any non-global key.

    Evaluates the mask on the pairs of the ``candidates`` block pairs only (elsewhere it
    allows no non-global key), a few at a time, on int32 indices (FlexAttention's index
    dtype; less memory traffic than int64)."""
    device = is_global.device
    pairs = torch.nonzero(candidates)
    query_offsets = torch.arange(block, device=device, dtype=torch.int32)
    key_offsets = torch.arange(key_block, device=device, dtype=torch.int32)
    used = torch.zeros(candidates.shape[0], candidates.shape[1] * key_block, dtype=torch.bool,
                       device=device)
    attends = torch.zeros(candidates.shape[0] * block, dtype=torch.int32, device=device)
    step = max(1, _NEEDS_ELEMENTS // (block * key_block))
    for chunk in pairs.split(step):
        rows = chunk[:, :1].to(torch.int32) * block + query_offsets  # (pairs, block)
        keys = chunk[:, 1:].to(torch.int32) * key_block + key_offsets  # (pairs, key_block)
        real_key = ~is_global[keys] & (keys < num_keys)
        allowed = evaluate(mask_mod, rows.clamp_max(num_queries - 1)[:, :, None],
                           keys.clamp_max(num_keys - 1)[:, None, :]) & real_key[:, None, :]
        used[chunk[:, :1], keys.long()] = allowed.any(dim=1)
        attends.index_add_(0, rows.flatten(), allowed.any(dim=2).flatten().to(torch.int32))
    return used, attends[:num_queries] > 0


def _band(used: Tensor, block: int, offset: int) -> tuple[int, int]:
    """(band_start, band): the keys, relative to each query block's first query (aligned to the
    keys: + ``offset``), that most query blocks use; (0, 0) when none is used by most."""
    query_blocks, width = used.shape
    blocks, keys = torch.nonzero(used, as_tuple=True)
    relative = keys - blocks * block - offset + width  # >= 0
    common = torch.nonzero(torch.bincount(relative, minlength=2 * width) * 2 > query_blocks)
    if not common.numel():
        return 0, 0
    first, last = int(common[0]) - width, int(common[-1]) - width
    return first + offset, last - first + 1


def _light_blocks_cost(counts: Tensor, light_keys: int, block: int, key_block: int,
                       num_keys: int) -> list:
    """(scores, K) for each K a light block may gather: blocks needing more key blocks are heavy."""
    cost = []
    smallest = 1 if light_keys == 0 else 0  # every light block gathers at least one key
    for k in sorted(set(counts.tolist()) | {smallest}):
        k = max(k, smallest)
        light = int((counts <= k).sum())
        cost.append((light * block * (light_keys + k * key_block)
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


def _in_band(blocks: Tensor, keys: Tensor, block: int, band_start: int, band: int) -> Tensor:
    """Bool, ``keys``' shape: is the key in the band of the query block (``blocks``, broadcast)."""
    relative = keys - blocks * block - band_start
    return (relative >= 0) & (relative < band)


def key_block_size(block: int) -> int:
    """Granularity of the key blocks gathered beyond the band: 64 keys (BigBird's random blocks),
    or the query block when shorter."""
    return min(64, block)


@functools.lru_cache(maxsize=8)
def _usage(pattern: Pattern, causal: bool, num_queries: int, num_keys: int, block: int,
           device: torch.device) -> tuple[Tensor, Tensor]:
    """:func:`_keys_used` for the pattern at ``block``; for twice :func:`block_size` derived from
    the usage at it (a query block of 2b uses what its two halves use), so that choosing
    between the two block sizes evaluates the pattern once."""
    base, key_block = block_size(num_queries), key_block_size(block)
    if block == 2 * base and key_block_size(base) == key_block:
        used, attends = _usage(pattern, causal, num_queries, num_keys, base, device)
        return F.pad(used, (0, 0, 0, used.shape[0] % 2)).view(-1, 2, used.shape[1]).any(dim=1), attends
    mask_mod = structural_mask_mod(pattern, causal, num_queries, num_keys)
    is_global = _is_global(_global_keys(pattern, num_queries, num_keys), num_keys, key_block, device)
    candidates = _candidate_blocks(pattern, causal, num_queries, num_keys, block, key_block, device)
    return _keys_used(mask_mod, candidates, num_queries, num_keys, is_global, block, key_block)


@functools.lru_cache(maxsize=32)
def _layout(pattern: Pattern, causal: bool, num_queries: int, num_keys: int, block: int,
            device: torch.device) -> BlockSparseLayout:
    mask_mod = structural_mask_mod(pattern, causal, num_queries, num_keys)
    key_block = key_block_size(block)
    global_keys = _global_keys(pattern, num_queries, num_keys)
    is_global = _is_global(global_keys, num_keys, key_block, device)
    used, attends = _usage(pattern, causal, num_queries, num_keys, block, device)
    band_start, band = _band(used, block, num_keys - num_queries)
    query_blocks = used.shape[0]
    outside = used & ~_in_band(torch.arange(query_blocks, device=device)[:, None],
                               torch.arange(used.shape[1], device=device)[None], block,
                               band_start, band)
    needs = outside.view(query_blocks, -1, key_block).any(dim=2)
    counts = needs.sum(dim=1)
    light_keys = len(global_keys) + band
    _, k = min(_light_blocks_cost(counts, light_keys, block, key_block, num_keys))
    heavy_blocks = torch.nonzero(counts > k).flatten().tolist()
    light_scores = block * (light_keys + k * key_block)  # per light block
    # Heavy blocks kept light but for their rows that need keys beyond the global ones and the
    # band; tried only where heavy blocks are few (each costs an evaluation of block x Nk).
    kept, heavy_rows = [], []
    for b in heavy_blocks:
        rows = torch.arange(b * block, min((b + 1) * block, num_queries), device=device)
        beyond = _beyond_band(mask_mod, rows, b, block, band_start, band, is_global, num_keys) \
            if len(heavy_blocks) * block * 8 <= num_queries else torch.ones_like(rows, dtype=torch.bool)
        if light_scores + int(beyond.sum()) * num_keys < len(rows) * num_keys:
            kept.append(b)
            rows = rows[beyond]
        heavy_rows += rows.tolist()
    light_blocks = torch.nonzero((counts <= k) | torch.isin(
        torch.arange(query_blocks, device=device), _index(tuple(kept), device))).flatten()
    # Each light block's key blocks: the needed ones first (a stable sort keeps them in order),
    # padded with unneeded ones, where the mask allows no key.
    key_blocks = needs[light_blocks].to(torch.int8).argsort(dim=1, descending=True, stable=True)
    # Which part has queries with no allowed key: known here, so the plan needs no
    # data-dependent branch. A light block gathers every key it needs, so its queries,
    # like the heavy ones, see every key they may attend: a query has one if it may attend a
    # global key or a non-global one (``attends``). Heavy rows in a light block may have none
    # there (their light output is dropped).
    rows = torch.arange(num_queries, device=device)
    attends = attends | evaluate(mask_mod, rows[:, None], _index(global_keys, device)[None]).any(dim=1)
    is_light = torch.zeros_like(counts, dtype=torch.bool).index_fill(0, light_blocks, True)[rows // block]
    is_heavy = torch.zeros_like(is_light).index_fill(0, _index(tuple(heavy_rows), device), True)
    return BlockSparseLayout(
        block, key_block, num_queries, num_keys, global_keys, tuple(light_blocks.tolist()),
        band_start, band, tuple(key_blocks[:, :k].flatten().tolist()), k, tuple(heavy_rows),
        light_rows_without_key=bool(kept) or not bool(attends[is_light].all()),
        heavy_rows_without_key=not bool(attends[is_heavy].all()),
        share=(len(light_blocks) * light_scores + len(heavy_rows) * num_keys)
        / (num_queries * num_keys))


def _beyond_band(mask_mod: MaskMod, rows: Tensor, query_block: int, block: int, band_start: int,
                 band: int, is_global: Tensor, num_keys: int) -> Tensor:
    """(len(rows),) bool: does the row (of ``query_block``) attend a key that is neither global
    nor in the block's band."""
    keys = torch.arange(num_keys, device=rows.device)
    outside = ~is_global[:num_keys] & ~_in_band(torch.tensor(query_block, device=rows.device),
                                                keys, block, band_start, band)
    return (evaluate(mask_mod, rows[:, None], keys[None]) & outside).any(dim=1)


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


def _pad_rows(t: Tensor, before: int, after: int) -> Tensor:
    """t (B, H, N, D) with zero rows before and after (F.pad copies even when both are 0)."""
    return F.pad(t, (0, 0, before, after)) if before > 0 or after > 0 else t


def _contiguous(blocks: tuple[int, ...]) -> range | None:
    """``blocks`` as a range when they are consecutive (then rows are a slice, not a gather)."""
    return range(blocks[0], blocks[-1] + 1) if blocks and blocks[-1] - blocks[0] + 1 == len(blocks) \
        else None


def _light_keys(layout: BlockSparseLayout, device: torch.device) -> tuple[Tensor, Tensor]:
    """(light blocks, L) the key each light block attends in each slot (clamped into [0, Nk)),
    and (light blocks, L) bool: is the slot a key of its own (not padding, not a global key
    again in the band, not a band key again in a key block)."""
    num_keys, block, key_block = layout.num_keys, layout.block, layout.key_block
    blocks = _index(layout.light_blocks, device)[:, None]
    is_global = _is_global(layout.global_keys, num_keys, key_block, device)
    global_keys = _index(layout.global_keys, device).expand(len(layout.light_blocks), -1)
    band = blocks * block + layout.band_start + torch.arange(layout.band, device=device)
    gathered = _block_rows(_index(layout.key_blocks, device), key_block).view(
        len(layout.light_blocks), layout.num_key_blocks * key_block)
    band_ok = (band >= 0) & (band < num_keys)
    band_ok &= ~is_global[band.clamp(0, num_keys - 1)]
    gathered_ok = (gathered < num_keys) & ~is_global[gathered] & ~_in_band(
        blocks, gathered, block, layout.band_start, layout.band)
    keys = torch.cat([global_keys, band, gathered], dim=1).clamp(0, num_keys - 1)
    return keys, torch.cat([torch.ones_like(global_keys, dtype=torch.bool), band_ok, gathered_ok],
                           dim=1)


@dataclass(frozen=True)
class _Attend:
    """Some query rows attending their keys with a mask; ``keep`` zeroes rows with no key."""

    rows: Tensor  # (R,) query rows, R = blocks * block_rows
    mask: Tensor | None  # (blocks, block_rows, L) bool; None: every key allowed
    keep: Tensor | None  # (blocks, block_rows, 1): 0 for rows with no allowed key; None: all have

    @staticmethod
    def masks(allowed: Tensor, rows_without_key: bool) -> tuple[Tensor | None, Tensor | None]:
        """(mask, keep) from the allowed pairs: rows with no allowed key (``rows_without_key``,
        known from the layout: no data-dependent branch here) attend a placeholder key, the
        first, and are zeroed."""
        if not rows_without_key:
            return allowed, None
        has_key = allowed.any(dim=-1, keepdim=True)
        mask = torch.cat([allowed[..., :1] | ~has_key, allowed[..., 1:]], dim=-1)
        return mask, has_key.to(torch.get_default_dtype())

    def attend(self, problem: AttentionProblem, q: Tensor, k: Tensor, v: Tensor,
               dropout_p: float) -> Tensor:
        """q (B * H, blocks, block_rows, D), k and v (B * H, blocks, L, D) -> (B, H, R, Dv)."""
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if self.mask is None else self.mask[None],
            dropout_p=dropout_p, scale=problem.scale)
        if self.keep is not None:
            out = out * self.keep.to(out.dtype)
        return out.flatten(1, 2).unflatten(0, problem.q.shape[:2])


@dataclass(frozen=True)
class _Heavy(_Attend):
    """Query rows attending every key."""

    def __call__(self, problem: AttentionProblem, dropout_p: float) -> Tensor:
        q = problem.q.index_select(2, self.rows).flatten(0, 1)[:, None]
        return self.attend(problem, q, problem.k.flatten(0, 1)[:, None],
                           problem.v.flatten(0, 1)[:, None], dropout_p)


@dataclass(frozen=True)
class _Light(_Attend):
    """Query blocks attending the global keys, their band and their gathered key blocks.

    The band is a strided view of the padded keys (``unfold``: overlapping windows, no copy;
    its backward sums the windows' gradients), and consecutive query blocks are a view of the
    padded queries, so a banded pattern gathers nothing."""

    layout: BlockSparseLayout
    global_keys: Tensor  # (G,)
    gathered: Tensor  # (light blocks * K * key_block,)
    pieces: tuple  # (mask, empty rows) of each key part, see _pieces

    def queries(self, q: Tensor) -> Tensor:
        """(B * H, light blocks, block, D)."""
        layout, blocks = self.layout, _contiguous(self.layout.light_blocks)
        if blocks is None:
            return q.index_select(2, self.rows).flatten(0, 1).unflatten(1, (len(layout.light_blocks), -1))
        first, past = blocks.start * layout.block, blocks.stop * layout.block
        q = _pad_rows(q, 0, past - layout.num_queries)
        return q[:, :, first:past].flatten(0, 1).unflatten(1, (len(blocks), layout.block))

    def band(self, t: Tensor) -> Tensor:
        """(B, H, light blocks, band, D): the bands, a view of t padded (a gather when the light
        blocks are not consecutive)."""
        layout, blocks = self.layout, _contiguous(self.layout.light_blocks)
        query_blocks = -(-layout.num_queries // layout.block)
        before = max(0, -layout.band_start)
        after = max(0, (query_blocks - 1) * layout.block + layout.band_start + layout.band
                    - layout.num_keys)
        padded = _pad_rows(t, before, after)[:, :, max(0, layout.band_start):]
        bands = padded.unfold(2, layout.band, layout.block).transpose(-1, -2)
        if blocks is None:
            return bands.index_select(2, _index(layout.light_blocks, t.device))
        return bands[:, :, blocks.start:blocks.stop]

    def key_parts(self, t: Tensor) -> list[Tensor]:
        """t's global keys (B * H, 1, G, D), bands (B * H, light blocks, band, D) and gathered
        key blocks (B * H, light blocks, K * key_block, D), those the layout has."""
        layout, num_light = self.layout, len(self.layout.light_blocks)
        parts = []
        if layout.global_keys:
            parts.append(t.index_select(2, self.global_keys).flatten(0, 1)[:, None])
        if layout.band:
            parts.append(self.band(t).flatten(0, 1))
        if layout.num_key_blocks:
            parts.append(t.index_select(2, self.gathered).flatten(0, 1).unflatten(1, (num_light, -1)))
        return parts

    def keys(self, t: Tensor) -> Tensor:
        """(B * H, light blocks, L, D): the key parts side by side (a copy when more than one)."""
        parts = [part.expand(-1, len(self.layout.light_blocks), -1, -1) for part in self.key_parts(t)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)

    def merges(self, problem: AttentionProblem, dropout_p: float) -> bool:
        """Whether the key parts run as separate fused calls merged by their log-sum-exp (on the
        CPU, several parts, no dropout, equal head dims) instead of one call on copied keys."""
        return (len(self.pieces) > 1 and dropout_p == 0.0 and problem.q.device.type == "cpu"
                and problem.q.shape[-1] == problem.v.shape[-1])

    def __call__(self, problem: AttentionProblem, dropout_p: float) -> Tensor:
        queries = self.queries(problem.q)
        if not self.merges(problem, dropout_p):
            return self.attend(problem, queries, self.keys(problem.k), self.keys(problem.v),
                               dropout_p)
        rows = (queries.shape[0], queries.shape[1] * queries.shape[2])
        parts = [Part(queries.reshape(rows[0], k.shape[1], -1, queries.shape[-1]), k, v, mask, empty)
                 for k, v, (mask, empty) in zip(self.key_parts(problem.k), self.key_parts(problem.v),
                                                self.pieces, strict=True)]
        return merged_attention(parts, rows, problem.scale).unflatten(0, problem.q.shape[:2])


def _pieces(layout: BlockSparseLayout, allowed: Tensor) -> tuple:
    """(mask, empty rows) of each key part (global keys, band, key blocks: those the layout has)
    for :func:`~robust_attn.kernels.lse_merge.merged_attention`: the global keys' over all the
    light rows at once, (1, R, G); the others per block. None where nothing is blocked."""
    sizes = [len(layout.global_keys), layout.band, layout.num_key_blocks * layout.key_block]
    pieces = []
    for index, piece in enumerate(allowed.split(sizes, dim=-1)):
        if not sizes[index]:
            continue
        if index == 0:
            piece = piece.reshape(1, -1, piece.shape[-1])
        empty = ~piece.any(dim=-1)
        pieces.append((None, None) if bool(piece.all()) else
                      (piece, empty if bool(empty.any()) else None))
    return tuple(pieces)


def _light(layout: BlockSparseLayout, mask_mod: MaskMod, device: torch.device) -> _Light:
    rows = _block_rows(_index(layout.light_blocks, device), layout.block)
    keys, key_ok = _light_keys(layout, device)
    # The pattern on int32 indices, as in the layout: half the memory traffic of int64.
    allowed = evaluate(mask_mod, rows.clamp_max(layout.num_queries - 1).int()[:, :, None],
                       keys.int()[:, None, :]) & key_ok[:, None, :]
    mask, keep = _Attend.masks(allowed, layout.light_rows_without_key)
    # Choices on the plan's data are made when it is built eagerly; traced code keeps the mask
    # and the one call on copied keys (a branch on traced data would break the graph).
    traced = torch.compiler.is_compiling()
    if not traced and keep is None and bool(allowed.all()):
        mask = None
    gathered = _block_rows(_index(layout.key_blocks, device), layout.key_block).flatten()
    return _Light(rows.flatten().clamp_max(layout.num_queries - 1), mask, keep, layout,
                  _index(layout.global_keys, device), gathered.clamp_max(layout.num_keys - 1),
                  () if traced else _pieces(layout, allowed))


def _heavy(layout: BlockSparseLayout, mask_mod: MaskMod, device: torch.device) -> _Heavy:
    rows = _index(layout.heavy_rows, device)
    keys = torch.arange(layout.num_keys, device=device)
    allowed = evaluate(mask_mod, rows.int()[:, None], keys.int()[None])[None]
    return _Heavy(rows, *_Attend.masks(allowed, layout.heavy_rows_without_key))


@dataclass(frozen=True)
class BlockSparsePlan:
    """Light query blocks attending their keys, heavy rows attending all keys, and ``order``:
    where each query's output lies in cat(light outputs, heavy outputs) (None: the light
    outputs, cut at Nq, are in token order already)."""

    layout: BlockSparseLayout
    light: _Light
    heavy: _Heavy
    order: Tensor | None  # (Nq,)

    @property
    def share(self) -> float:
        """Scores computed, as a share of the dense Nq * Nk."""
        return self.layout.share


def build_plan(layout: BlockSparseLayout, pattern: Pattern, causal: bool,
               device: torch.device) -> BlockSparsePlan:
    """The plan's tensors from its layout (shape-static operations only: traceable)."""
    mask_mod = structural_mask_mod(pattern, causal, layout.num_queries, layout.num_keys)
    light, heavy = _light(layout, mask_mod, device), _heavy(layout, mask_mod, device)
    order = None
    if layout.heavy_rows:
        # Each query's light output, then the heavy outputs over it (light rows past Nq drop).
        light_rows = _block_rows(_index(layout.light_blocks, device), layout.block).flatten()
        real = light_rows < layout.num_queries
        order = torch.zeros(layout.num_queries, dtype=torch.long, device=device)
        order[light_rows[real]] = torch.nonzero(real).flatten()
        order[heavy.rows] = len(light_rows) + torch.arange(len(heavy.rows), device=device)
    return BlockSparsePlan(layout, light, heavy, order)


# Eager mode reuses the plan's tensors; traced code builds them in the graph instead.
cached_plan = functools.lru_cache(maxsize=32)(build_plan)


def block_size(num_queries: int) -> int:
    """Query block length: about N / 16, a power of two in [16, 128] (larger blocks use SDPA's
    fused CPU kernel better; smaller ones follow a short sequence's pattern more closely)."""
    return min(128, max(16, 2 ** round(math.log2(num_queries / 16))))


# A layout with twice the block is taken when it computes at most this many times the scores:
# SDPA's CPU kernel does a score of a 256-query block about 1.2x faster than of a 128-query one
# (measured at N = 8192, H = 8, D = 64, fwd+bwd: 0.63 s for 256 x 768 keys against 0.65 s for
# 128 x 640).
LARGER_BLOCK_SHARE = 1.2


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
    """The layout at ``block``, or when None at :func:`block_size` or twice it, whichever computes
    fewer scores (the larger when within :data:`LARGER_BLOCK_SHARE` of the smaller: a pattern
    whose blocks are 256 tokens, such as the benchmark's Fixed(256, 8), gathers nothing then)."""
    # operator.index makes a symbolic length concrete (export with a static length).
    num_queries, num_keys = operator.index(problem.num_queries), operator.index(problem.num_keys)
    blocks = (block,) if block is not None else (block_size(num_queries),)
    if block is None and 2 * blocks[0] <= min(256, num_queries):
        blocks += (2 * blocks[0],)
    layouts = [block_sparse_layout(problem.pattern, problem.causal, num_queries, num_keys, b,
                                   problem.q.device) for b in blocks]
    if len(layouts) == 2 and layouts[1].share <= LARGER_BLOCK_SHARE * layouts[0].share:
        return layouts[1]
    return layouts[0]


def block_sparse_attention(problem: AttentionProblem, dropout_p: float = 0.0,
                           block: int | None = None) -> Tensor:
    plan = _plan(_problem_layout(problem, block), problem.pattern, problem.causal, problem.q.device)
    if plan.order is None:
        return plan.light(problem, dropout_p)[:, :, :problem.num_queries]
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

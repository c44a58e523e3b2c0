"""FlexAttention: score modifiers and block-sparse masks without materialising the attention matrix.

The problem's score_mods and the finite part of its float mask (as
``score + bias[b, h, q, kv]``) become one score_mod; every blocked key (bool
False, float -inf, causal) goes into a mask_mod compiled into a BlockMask, so
a query with no allowed key returns zeros. Both are handed to
``torch.nn.attention.flex_attention``.

BlockMasks: the one of the causal mask and the sparsity pattern is built once
per (pattern, causal, Nq, Nk, device) and cached, so a new length builds a new
one and never reuses a stale one; under an outer ``torch.compile`` it comes from
that cache through an opaque op (:func:`_structural_kv_blocks`). A dense mask's
is built at the mask's own batch and head sizes and cached per mask tensor
while the tensor is unchanged (:func:`_dense_block_mask`).

Compilation (:func:`_compiled_flex_attention`): fullgraph, with automatic
dynamic shapes off the CPU and static shapes on it; at the recompile limit
(:data:`RECOMPILE_LIMIT`) the call warns (:class:`FlexRecompileWarning`) and runs on the chunked
kernel instead of torch's unfused fallback.

Refused (``unsupported``): non-softmax normalizers, dropout; on CUDA, head
widths below 16 (inductor's NYI); on the CPU, gradients (FlexAttention's CPU
backward raises NotImplementedError) and dtypes other than float32, float16 and
bfloat16. ``auto`` does not choose it on the CPU (robust_attn.kernels). Head
widths are rounded up to a power of two inside FlexAttention (a sink logit's
extra channel makes 64 + 1 cost 128).
"""

from __future__ import annotations

import functools
import math
import warnings
import weakref

import torch
from torch import Tensor

from .._compat import (
    assume_constant_result,
    dynamo_config_patch,
    flex_lse_request,
    opaque_op,
    recompile_limit_error,
)
from ..problem import AttentionProblem, ScoreMod
from ..sparse.pattern import Pattern, structural_mask_mod
from .base import Kernel

RECOMPILE_LIMIT = 64
"""dynamo's recompile_limit for FlexAttention's frames (torch's default, 8, is global): each
dtype, grad mode, head width, score modifier and kind of mask is a compiled variant, so a
model that trains and evaluates in two dtypes with a few mask kinds passes 8 (the speed
benchmark sets the same figure)."""


class FlexRecompileWarning(UserWarning):
    """FlexAttention reached dynamo's recompile limit; the call ran on the chunked kernel instead."""


# Two wrappers of one function: two frames, so dynamo keeps their compiled variants and
# recompile counts apart (see _compiled_flex_attention).
def _flex_attention_static_shapes(*args, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(*args, **kwargs)


def _flex_attention_dynamic_shapes(*args, **kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention(*args, **kwargs)


@functools.cache
def _compiled_flex_attention(dynamic: bool):
    """flex_attention compiled once per process, with fullgraph, and with automatic dynamic shapes
    (``dynamic``) or static ones; the two are separate frames, with separate caches.

    Dynamic (off the CPU): the first call compiles for its shapes; a second batch size
    or length recompiles once with that size symbolic, and later sizes reuse the
    kernel instead of each adding a cache entry (flex_attention itself marks heads and
    head width static). Floats (the scale, a softcap) stay specialised
    (:func:`flex_attention` patches ``specialize_float``): a symbolic float becomes a
    0-d tensor read with ``.item()``, which inductor's CPU FlexAttention cannot lower
    (measured, torch 2.14: "LoweringException: unbacked_bindings").

    Static (on the CPU): inductor's C++ FlexAttention template fails to compile with
    symbolic sizes and a mask_mod that reads a tensor (measured, torch 2.14: "error:
    'cur_qSplitSize5' was not declared"), so each shape compiles on its own there.

    ``fullgraph=True``: when the recompile limit (:data:`RECOMPILE_LIMIT`) is reached
    anyway (CPU shapes, dtypes, head widths, score modifiers, grad modes), dynamo raises
    ``FailOnRecompileLimitHit`` (torch/_dynamo/convert_frame.py) instead of running
    flex_attention uncompiled, which would materialise the (B, H, Nq, Nk) scores
    ("flex_attention called without torch.compile()", torch/nn/attention/flex_attention.py);
    :func:`flex_attention` then warns and runs the chunked kernel."""
    if dynamic:
        return torch.compile(_flex_attention_dynamic_shapes, dynamic=None, fullgraph=True)
    return torch.compile(_flex_attention_static_shapes, dynamic=False, fullgraph=True)


def _expanded(mask: Tensor, problem: AttentionProblem) -> Tensor:
    batch, heads = problem.q.shape[:2]
    return mask.expand(batch, heads, problem.num_queries, problem.num_keys)


def _score_mod(problem: AttentionProblem) -> ScoreMod | None:
    mods = problem.score_mod()
    mask = problem.attn_mask
    bias = _expanded(mask, problem) if mask is not None and mask.dtype != torch.bool else None
    if mods is None and bias is None:
        return None

    def score_mod(score, b, h, q_idx, kv_idx):
        if mods is not None:
            score = mods(score, b, h, q_idx, kv_idx)
        if bias is None:
            return score
        # Blocked (-inf) entries are left to the BlockMask; adding them here too would
        # turn a row with no allowed key into nan instead of zeros.
        added = bias[b, h, q_idx, kv_idx]
        return score + torch.where(added > -math.inf, added, 0.0)

    return score_mod


_BLOCK_SIZE = 128  # create_block_mask's default (torch/nn/attention/flex_attention.py)


@functools.lru_cache(maxsize=32)
def _cached_structural_block_mask(pattern: Pattern | None, causal: bool, num_queries: int,
                                  num_keys: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    mask_mod = structural_mask_mod(pattern, causal, num_queries, num_keys)
    return create_block_mask(mask_mod, None, None, num_queries, num_keys, device=device,
                             BLOCK_SIZE=_BLOCK_SIZE)


_PATTERNS: list[Pattern | None] = [None]
"""Every pattern the structural BlockMask op has seen, by index (its argument)."""


@assume_constant_result
def _pattern_index(pattern: Pattern | None) -> int:
    """The pattern's index in _PATTERNS (added if new); a constant of the graph when compiled."""
    for index, known in enumerate(_PATTERNS):
        if known == pattern:
            return index
    _PATTERNS.append(pattern)
    return len(_PATTERNS) - 1


def _block_count(length: int) -> int:
    return -(-length // _BLOCK_SIZE)


def _structural_kv_blocks_fake(pattern_index, causal, num_queries, num_keys, device):
    """The shapes and dtypes of :func:`_structural_kv_blocks`' outputs (its fake implementation)."""
    rows, columns = _block_count(num_queries), _block_count(num_keys)
    counts = torch.empty(1, 1, rows, dtype=torch.int32, device=device)
    indices = torch.empty(1, 1, rows, columns, dtype=torch.int32, device=device)
    return [counts, indices, torch.empty_like(counts), torch.empty_like(indices)]


@opaque_op("robust_attn::structural_kv_blocks", _structural_kv_blocks_fake)
def _structural_kv_blocks(pattern_index: int, causal: bool, num_queries: int, num_keys: int,
                          device: torch.device) -> list[Tensor]:
    """The kv block tensors of :func:`_cached_structural_block_mask`, as an op opaque to dynamo:
    under an outer torch.compile the graph calls it (a cache lookup and four small copies)
    instead of tracing create_block_mask, which would evaluate the mask over all Nq x Nk
    pairs in every step (dynamo ignores an lru_cache and traces what it wraps)."""
    block_mask = _cached_structural_block_mask(_PATTERNS[pattern_index], causal, num_queries,
                                               num_keys, device)
    return [t.clone() for t in (block_mask.kv_num_blocks, block_mask.kv_indices,
                                block_mask.full_kv_num_blocks, block_mask.full_kv_indices)]


def _structural_block_mask(pattern: Pattern | None, causal: bool, num_queries: int,
                           num_keys: int, device: torch.device):
    """The BlockMask of the causal mask and the pattern, built once per (pattern, causal, lengths,
    device); in a compiled graph assembled from the cached block tensors (see
    :func:`_structural_kv_blocks`)."""
    if not torch.compiler.is_compiling():
        return _cached_structural_block_mask(pattern, causal, num_queries, num_keys, device)
    from torch.nn.attention.flex_attention import BlockMask

    blocks = _structural_kv_blocks(_pattern_index(pattern), causal, num_queries, num_keys, device)
    return BlockMask.from_kv_blocks(
        *blocks, BLOCK_SIZE=_BLOCK_SIZE, seq_lengths=(num_queries, num_keys),
        mask_mod=structural_mask_mod(pattern, causal, num_queries, num_keys))


_dense_block_masks: dict[int, tuple] = {}
"""id(mask tensor) -> (its layout and version, BlockMask); an entry leaves with its tensor, or
when more than _DENSE_CACHE_SIZE masks are alive (the oldest first)."""
_DENSE_CACHE_SIZE = 16


def _dense_block_mask(problem: AttentionProblem):
    """The BlockMask of the problem's dense mask (bool False and float -inf block) with the causal
    mask and the pattern.

    Built at the mask's own batch and head sizes (1 where it broadcasts: a (B, 1, 1, N)
    key-padding mask is evaluated over B * Nq * Nk pairs, not B * H * Nq * Nk), and
    cached per mask tensor while it is unchanged (the same tensor object or a view of
    it, and the same version counter), so the layers of one step, and steps that
    reuse one mask, build it once. In a compiled graph it is built each call: the
    mask is data there."""
    from torch.nn.attention.flex_attention import create_block_mask

    mask = problem.attn_mask
    compiling = torch.compiler.is_compiling()
    if not compiling:
        root = mask._base if mask._base is not None else mask
        key = (mask.shape, mask.stride(), mask.storage_offset(), mask.dtype, mask._version,
               problem.pattern, problem.causal, problem.num_queries, problem.num_keys)
        cached = _dense_block_masks.get(id(root))
        if cached is not None and cached[0] == key:
            return cached[1]
    # A new tensor (not a view), so the cached mask_mod does not keep the caller's mask alive;
    # expanded to q's batch and heads, which the kernel's mask_mod is called with.
    keep = mask.clone() if mask.dtype == torch.bool else mask > -math.inf
    full = _expanded(keep, problem)
    structure = structural_mask_mod(problem.pattern, problem.causal, problem.num_queries,
                                    problem.num_keys)

    def allowed(b, h, q_idx, kv_idx):
        allowed_here = full[b, h, q_idx, kv_idx]
        return allowed_here if structure is None else allowed_here & structure(b, h, q_idx, kv_idx)

    block_mask = create_block_mask(allowed, mask.shape[0], mask.shape[1], problem.num_queries,
                                   problem.num_keys, device=problem.q.device,
                                   BLOCK_SIZE=_BLOCK_SIZE)
    if not compiling:
        if id(root) not in _dense_block_masks:
            weakref.finalize(root, _dense_block_masks.pop, id(root), None)
        _dense_block_masks[id(root)] = (key, block_mask)
        while len(_dense_block_masks) > _DENSE_CACHE_SIZE:
            del _dense_block_masks[next(iter(_dense_block_masks))]
    return block_mask


def _block_mask(problem: AttentionProblem):
    """Blocked keys (bool False, float -inf, causal, pattern) as a BlockMask, so blocked rows
    give zeros."""
    if problem.attn_mask is not None:
        return _dense_block_mask(problem)
    if not problem.causal and problem.pattern is None:
        return None
    return _structural_block_mask(problem.pattern, problem.causal, problem.num_queries,
                                  problem.num_keys, problem.q.device)


def flex_attention(problem: AttentionProblem, dropout_p: float = 0.0,
                   dynamic: bool | None = None) -> Tensor:
    """FlexAttention of the problem; ``dynamic``: compile with symbolic sizes (default: off the
    CPU, see :func:`_compiled_flex_attention`)."""
    return _flex(problem, dropout_p, dynamic, lse=False)[0]


def flex_attention_with_lse(problem: AttentionProblem,
                            dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """The output and each row's log-sum-exp (FlexAttention's ``AuxRequest(lse=True)``)."""
    return _flex(problem, dropout_p, None, lse=True)


def _flex(problem: AttentionProblem, dropout_p: float, dynamic: bool | None,
          lse: bool) -> tuple[Tensor, Tensor | None]:
    if dynamic is None:
        dynamic = problem.q.device.type != "cpu"
    arguments = dict(score_mod=_score_mod(problem), block_mask=_block_mask(problem),
                     scale=problem.scale)
    if lse:
        arguments["return_aux"] = flex_lse_request()
    if torch.compiler.is_compiling():  # compiled with the caller's graph
        from torch.nn.attention.flex_attention import flex_attention as uncompiled

        return _with_lse(uncompiled(problem.q, problem.k, problem.v, **arguments), lse)
    try:
        with dynamo_config_patch(specialize_float=True, recompile_limit=RECOMPILE_LIMIT):
            return _with_lse(_compiled_flex_attention(dynamic)(problem.q, problem.k, problem.v,
                                                               **arguments), lse)
    except recompile_limit_error():
        warnings.warn(
            f"FlexAttention reached its recompile limit (robust_attn.kernels.flex.RECOMPILE_LIMIT "
            f"= {RECOMPILE_LIMIT} compiled variants: every shape on the "
            f"CPU; dtypes, head widths, score modifiers, grad modes); this call runs on the "
            f"chunked kernel instead of an unfused FlexAttention that would materialise the "
            f"attention matrix. Raise the limit or use fewer variants to keep FlexAttention.",
            FlexRecompileWarning, stacklevel=2)
        from .chunked import CHUNKED

        solved = CHUNKED.solve(problem, dropout_p, lse=lse)
        return solved.out, solved.lse


def _with_lse(result, lse: bool) -> tuple[Tensor, Tensor | None]:
    """(out, lse) from FlexAttention's result: ``out`` alone, or ``(out, AuxOutput)``."""
    if not lse:
        return result, None
    out, aux = result
    return out, aux.lse


_CPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
CUDA_MIN_HEAD_DIM = 16
"""Inductor's CUDA FlexAttention raises "NYI: embedding dimension of the query, key, and value
must be at least 16" below this width (torch/_inductor/kernel/flex/flex_attention.py: tl.dot)."""


def _unsupported(problem: AttentionProblem, dropout_p: float) -> str | None:
    if not problem.is_softmax:
        return "FlexAttention computes softmax attention only: use kernel='chunked'"
    if dropout_p > 0.0:
        return "FlexAttention has no attention dropout: use kernel='sdpa' or 'chunked', or attn_drop=0"
    if problem.q.device.type == "cpu" and problem.q.dtype not in _CPU_DTYPES:
        return (f"FlexAttention on the CPU computes float32, float16 and bfloat16 only, "
                f"not {problem.q.dtype}: use kernel='sdpa' or 'chunked'")
    if problem.q.device.type == "cuda" and min(problem.q.shape[-1], problem.v.shape[-1]) < CUDA_MIN_HEAD_DIM:
        return (f"FlexAttention on CUDA needs head widths of at least {CUDA_MIN_HEAD_DIM} "
                f"(inductor: NYI), not q/k {problem.q.shape[-1]}, v {problem.v.shape[-1]}: "
                f"use kernel='sdpa' or 'chunked'")
    if problem.q.device.type == "cpu" and problem.needs_grad:
        return ("FlexAttention on the CPU runs forward only (its backward raises "
                "NotImplementedError): use kernel='sdpa' or 'chunked' to train on the CPU")
    return None


FLEX = Kernel("flex", flex_attention, _unsupported,
              run_with_lse=flex_attention_with_lse)

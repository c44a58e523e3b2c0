"""Block-sparse attention by gathering each query block's keys (overlapping chunks, generalised).

Queries are cut into blocks of :func:`block_size` tokens (128 from N = 2048).
A plan, built from the exact pattern once per (pattern, causal, Nq, Nk,
device, block) and cached, says for each query block which keys it gathers:

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
are N * L / block rows each). Building the plan evaluates the pattern on all
Nq * Nk pairs once (seconds at N = 8192 on a CPU), as FlexAttention's
create_block_mask does. Every step is an index_select, reshape or cat, so
gradients flow (index_select's backward adds into the gathered keys).

A query with no allowed key attends a placeholder key and its output is
multiplied by 0: zeros, with zero gradients, never nan.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..problem import AttentionProblem
from ..sparse.pattern import MaskMod, Pattern, evaluate, structural_mask_mod
from .base import Kernel
from .structured import structured_unsupported

# auto uses this kernel only when its plan computes at most this share of the dense scores.
MAX_SHARE = 0.5
_NEEDS_ELEMENTS = 1 << 22  # pairs evaluated at once when finding a plan's key blocks


@dataclass(frozen=True)
class _Attend:
    """Some query rows attending gathered keys with a mask; ``keep`` zeroes rows with no key."""

    rows: Tensor  # (R,) query rows, R = blocks * block_rows
    keys: Tensor  # (blocks, L) key indices gathered for each block of rows
    mask: Tensor  # (blocks, block_rows, L) bool (SDPA's fused CPU kernel needs it 4D: mask[None])
    keep: Tensor | None  # (blocks, block_rows, 1): 0 for rows with no allowed key; None: all have

    @classmethod
    def build(cls, rows: Tensor, keys: Tensor, allowed: Tensor) -> _Attend:
        has_key = allowed.any(dim=-1, keepdim=True)
        if bool(has_key.all()):
            return cls(rows, keys, allowed, None)
        allowed = allowed.clone()
        allowed[..., 0] |= ~has_key[..., 0]
        return cls(rows, keys, allowed, has_key.to(torch.get_default_dtype()))

    @property
    def scores(self) -> int:
        return self.mask.numel()

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

    light: _Attend
    heavy: _Attend
    order: Tensor  # (Nq,)
    num_queries: int
    num_keys: int

    @property
    def share(self) -> float:
        """Scores computed, as a share of the dense Nq * Nk."""
        return (self.light.scores + self.heavy.scores) / (self.num_queries * self.num_keys)


def _block_needs(mask_mod: MaskMod, num_queries: int, num_keys: int, is_global: Tensor,
                 block: int) -> Tensor:
    """(query blocks, key blocks) bool: does any query of the block attend a non-global key there.

    Evaluates the mask on every pair once, a few query blocks at a time, on int32 indices
    (FlexAttention's index dtype; less memory traffic than int64)."""
    device = is_global.device
    key_blocks = -(-num_keys // block)
    keys = torch.arange(key_blocks * block, device=device, dtype=torch.int32)
    real_key = ~is_global & (keys < num_keys)
    keys = keys.clamp_max(num_keys - 1)[None]
    step = max(1, _NEEDS_ELEMENTS // (len(keys[0]) * block)) * block
    needs = []
    for start in range(0, num_queries, step):
        rows = torch.arange(start, start + step, device=device, dtype=torch.int32)
        allowed = evaluate(mask_mod, rows.clamp_max(num_queries - 1)[:, None], keys) & real_key
        needs.append(allowed.view(-1, block, key_blocks * block).any(dim=1)
                     .view(-1, key_blocks, block).any(dim=2))
    return torch.cat(needs)[: -(-num_queries // block)]


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


@functools.lru_cache(maxsize=32)
def block_sparse_plan(pattern: Pattern, causal: bool, num_queries: int, num_keys: int,
                      device: torch.device, block: int) -> BlockSparsePlan:
    """The plan for a problem's pattern and lengths (cached: a new length builds a new plan)."""
    mask_mod = structural_mask_mod(pattern, causal, num_queries, num_keys)
    offset = num_keys - num_queries
    global_keys = torch.tensor(
        sorted(set(range(offset)) | {offset + j for j in pattern.global_keys(num_queries)}),
        dtype=torch.long, device=device)
    is_global = torch.zeros(-(-num_keys // block) * block, dtype=torch.bool, device=device)
    is_global[global_keys] = True

    needs = _block_needs(mask_mod, num_queries, num_keys, is_global, block)
    counts = needs.sum(dim=1)
    _, k = min(_light_blocks_cost(counts, len(global_keys), block, num_keys))
    light_blocks = torch.nonzero(counts <= k).flatten()

    # Each light block's key blocks: the needed ones first (stable sort keeps them in order),
    # padded with unneeded ones that the mask blocks.
    chosen = needs[light_blocks].to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :k]
    needed = needs[light_blocks].gather(1, chosen)
    positions = chosen[:, :, None] * block + torch.arange(block, device=device)
    gathered = ((needed[:, :, None] & (positions < num_keys) & ~is_global[positions]).flatten(1))
    keys = torch.cat([global_keys.expand(len(light_blocks), -1),
                      positions.flatten(1).clamp_max(num_keys - 1)], dim=1)
    key_ok = torch.cat([torch.ones_like(keys[:, :len(global_keys)], dtype=torch.bool), gathered],
                       dim=1)
    rows = light_blocks[:, None] * block + torch.arange(block, device=device)
    light_allowed = evaluate(mask_mod, rows.clamp_max(num_queries - 1)[:, :, None],
                              keys[:, None, :]) & key_ok[:, None, :]
    light = _Attend.build(rows.flatten().clamp_max(num_queries - 1), keys, light_allowed)

    heavy_blocks = torch.nonzero(counts > k).flatten()
    heavy_rows = (heavy_blocks[:, None] * block + torch.arange(block, device=device)).flatten()
    heavy_rows = heavy_rows[heavy_rows < num_queries]
    all_keys = torch.arange(num_keys, device=device)
    heavy = _Attend.build(heavy_rows, all_keys[None],
                          evaluate(mask_mod, heavy_rows[None, :, None], all_keys[None, None]))

    order = torch.empty(num_queries, dtype=torch.long, device=device)
    real = rows.flatten() < num_queries
    order[rows.flatten()[real]] = torch.nonzero(real).flatten()
    order[heavy_rows] = rows.numel() + torch.arange(len(heavy_rows), device=device)
    return BlockSparsePlan(light, heavy, order, num_queries, num_keys)


def block_size(num_queries: int) -> int:
    """Query block length: about N / 16, a power of two in [16, 128] (larger blocks use SDPA's
    fused CPU kernel better; smaller ones follow a short sequence's pattern more closely)."""
    return min(128, max(16, 2 ** round(math.log2(num_queries / 16))))


def _plan(problem: AttentionProblem, block: int | None) -> BlockSparsePlan:
    block = block_size(problem.num_queries) if block is None else block
    return block_sparse_plan(problem.pattern, problem.causal, problem.num_queries,
                             problem.num_keys, problem.q.device, block)


def block_sparse_attention(problem: AttentionProblem, dropout_p: float = 0.0,
                           block: int | None = None) -> Tensor:
    plan = _plan(problem, block)
    parts = [part(problem, dropout_p) for part in (plan.light, plan.heavy) if part.rows.numel()]
    return torch.cat(parts, dim=2).index_select(2, plan.order)


def _unsupported(problem: AttentionProblem, dropout_p: float) -> str | None:
    reason = structured_unsupported(problem)
    if reason is not None:
        return reason
    share = _plan(problem, None).share
    if share > MAX_SHARE:
        return (f"the pattern is dense at the block-sparse kernel's block size "
                f"{block_size(problem.num_queries)}: "
                f"it would compute {share:.0%} of the dense scores")
    return None


BLOCK_SPARSE = Kernel("block_sparse", block_sparse_attention, _unsupported)

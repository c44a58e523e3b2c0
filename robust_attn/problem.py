"""The attention problem every kernel solves, in one value.

Every kernel computes the same thing (heads layout (B, H, N, D)):

    s_ij  = score_mods(scale * q_i . k_j)  +  bias_ij          (bias: -inf blocks a key)
    s_ij  = -inf  where causal and j > i + (Nk - Nq)
    s_ij  = -inf  where a sparsity pattern blocks (i, j)
    s_ij  = -inf  where a per-call block selection leaves j's block out for i's block
    out_i = sum_j normalizer(s)_ij v_j

Score modifiers use FlexAttention's ``score_mod(score, b, h, q_idx, kv_idx)``
signature (torch/nn/attention/flex_attention.py), so the same function runs on
FlexAttention and on the eager reference.

Causal attention is aligned lower-right: query i sees key j when
j <= i + (Nk - Nq). For self-attention (Nq == Nk) that is the usual triangle;
when a mitigation prepends keys (sink tokens, a sink logit's zero key), the
prepended keys stay visible to every query, which is what the mitigations need.
(SDPA's own ``is_causal`` is aligned top-left; the SDPA kernel only uses it
when Nq == Nk.)

A sparsity pattern (:mod:`robust_attn.sparse`) is aligned the same way: it
covers the Nq query tokens, which are the last Nq keys, and the prepended keys
stay visible to every query (:meth:`robust_attn.sparse.Pattern.problem_mask_mod`).

Score modifiers are aligned the same way too. The problem counts the keys
prepended in front of the tokens' own (``prepended_keys``: sink tokens, a sink
logit's key). A position-free modifier (softcap) sees every key, prepended ones
included, at its kernel index. A positional one (its ``positional`` attribute is
True: ALiBi's distance bias) sees token positions, q_pos = q_idx + (Nk - P - Nq)
and kv_pos = kv_idx - P with P = prepended_keys, and is not applied to the
prepended keys at all, which have no position: their scores stay as they are.
:meth:`AttentionProblem.score_mod` composes them into one FlexAttention-style
function that every kernel applies.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .sparse import Pattern
    from .sparse.selection import BlockSelection

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def is_positional(score_mod: ScoreMod) -> bool:
    """Whether ``score_mod`` depends on token positions (its ``positional`` attribute)."""
    return bool(getattr(score_mod, "positional", False))


def allowed_key_counts(num_queries: int, num_keys: int, attn_mask: Tensor | None,
                       is_causal: bool, device: torch.device) -> Tensor | None:
    """Per query row, the number of keys the mask and causality (lower-right aligned) let it
    attend: (B', H', Nq, 1) int64, B' and H' 1 or the mask's; None when every row sees all
    ``num_keys`` keys (no mask, not causal). Linear in N unless the mask itself is (Nq, Nk):
    causality alone is i + 1 + (Nk - Nq), and a key-padding mask under causality is counted by
    prefix sums over its keys. (Sigmoid attention's b_i, Scalable-Softmax's n.)"""
    if attn_mask is None and not is_causal:
        return None
    queries = torch.arange(num_queries, device=device)
    last_key = queries + (num_keys - num_queries)  # the last key row i may see when causal
    if attn_mask is None:
        return (last_key + 1).clamp(0, num_keys).view(1, 1, num_queries, 1)
    allowed = attn_mask if attn_mask.dtype == torch.bool else attn_mask > -math.inf
    allowed = allowed.expand(*allowed.shape[:-1], num_keys)  # a mask broadcast over the keys
    if not is_causal:
        return allowed.sum(dim=-1, keepdim=True)
    if allowed.shape[-2] == 1:  # the same keys for every query (key padding): prefix sums
        prefix = allowed[..., 0, :].cumsum(dim=-1)  # allowed keys among the first j + 1
        counts = prefix.index_select(-1, last_key.clamp(0, num_keys - 1))
        return torch.where(last_key >= 0, counts, 0).unsqueeze(-1)
    keys = torch.arange(num_keys, device=device)
    return (allowed & (keys <= last_key[:, None])).sum(dim=-1, keepdim=True)


@dataclass(frozen=True)
class Softmax:
    """Row-wise softmax over the allowed keys; a row with no allowed key gives zeros."""

    name = "softmax"

    def __call__(self, scores: Tensor) -> Tensor:
        # Softmax is shift invariant, so the row max needs no gradient. A row with no
        # allowed key (max = -inf) is shifted by 0 instead, so its weights are exp(-inf) = 0,
        # and divided by 1 instead of its zero sum: zeros, forward and backward, never nan.
        row_max = scores.detach().amax(dim=-1, keepdim=True)
        empty_row = row_max == -math.inf
        weights = torch.exp(scores - row_max.masked_fill(empty_row, 0.0))
        return weights / weights.sum(dim=-1, keepdim=True).masked_fill(empty_row, 1.0)


SOFTMAX = Softmax()


@dataclass(frozen=True)
class AttentionProblem:
    """Queries, keys, values and everything that shapes their scores.

    q: (B, H, Nq, D); k: (B, H, Nk, D); v: (B, H, Nk, Dv).
    attn_mask: None, bool (True = may attend) or additive float, broadcastable
        to (B, H, Nq, Nk).
    causal: lower-right aligned causal mask (see the module docstring).
    score_mods: applied in order to ``scale * q k^T`` before the mask.
    normalizer: maps masked scores (B, H, Nq, Nk) to weights, each query row on its
        own (the chunked kernel relies on it); softmax unless a mitigation replaces it
        (sigmoid attention). A normalizer that acts on each score on its own also has
        ``elementwise(num_keys)``: the same function on any part of a row of num_keys
        keys (the tiled kernel splits rows into tiles with it).
    pattern: a sparsity pattern (robust_attn.sparse), applied like a mask
        (aligned as described in the module docstring); None allows every pair.
    prepended_keys: how many of the keys were prepended in front of the tokens' own
        (sinks); positional score modifiers skip them (module docstring).
    selection: a per-call block selection (block_topk: robust_attn.sparse.selection), applied
        like a mask on top of the others; None allows every pair. The selected-blocks kernel
        runs it; every other kernel gets it as a bool mask (:meth:`with_selection_as_mask`).
    sink_logits: per-head sink logits s_h (H,) (sink_logit: gpt-oss; Miller 2023), one more
        key of score s_h and zero value, visible to every query; None: no sink. The sdpa_sink
        kernel runs it by the rows' log-sum-exp; every other kernel, and whoever reads a solved
        problem, gets it as that key (:meth:`with_sink_as_key`).
    """

    q: Tensor
    k: Tensor
    v: Tensor
    scale: float
    attn_mask: Tensor | None = None
    causal: bool = False
    score_mods: tuple[ScoreMod, ...] = ()
    normalizer: Callable[[Tensor], Tensor] = SOFTMAX
    pattern: Pattern | None = None
    prepended_keys: int = 0
    selection: BlockSelection | None = None
    sink_logits: Tensor | None = None

    @property
    def num_queries(self) -> int:
        return self.q.shape[-2]

    @property
    def num_keys(self) -> int:
        return self.k.shape[-2]

    @property
    def is_softmax(self) -> bool:
        return self.normalizer is SOFTMAX

    @property
    def may_block_keys(self) -> bool:
        """A mask, causality or a pattern may block keys, so a row may have none allowed.
        (Score modifiers change scores; they do not block.)"""
        return (self.attn_mask is not None or self.causal or self.pattern is not None
                or self.selection is not None)

    def score_mod(self) -> ScoreMod | None:
        """The score modifiers as one function of (score, b, h, q_idx, kv_idx) at kernel indices,
        positional ones re-indexed to token positions and kept off the prepended keys (module
        docstring); None when there is none. It captures only the modifiers and two integers,
        so FlexAttention can compile it."""
        mods = self.score_mods
        if not mods:
            return None
        prepended = self.prepended_keys
        query_offset = self.num_keys - prepended - self.num_queries

        def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
            for mod in mods:
                if not is_positional(mod):
                    score = mod(score, b, h, q_idx, kv_idx)
                elif prepended == 0:
                    score = mod(score, b, h, q_idx + query_offset, kv_idx)
                else:
                    moved = mod(score, b, h, q_idx + query_offset, kv_idx - prepended)
                    score = torch.where(kv_idx >= prepended, moved, score)
            return score

        return score_mod

    def normalize(self, logits: Tensor) -> Tensor:
        """The weights of masked ``logits``: the normalizer, or torch.softmax for softmax when
        nothing can block a key (every row has an allowed key, so :class:`Softmax`'s guard
        against empty rows, four more passes over the scores, has nothing to do)."""
        if self.is_softmax and not self.may_block_keys:
            return torch.softmax(logits, dim=-1)
        return self.normalizer(logits)

    @property
    def needs_grad(self) -> bool:
        return torch.is_grad_enabled() and any(
            t.requires_grad for t in (self.q, self.k, self.v, self.attn_mask) if t is not None
        )

    def with_(self, **changes) -> AttentionProblem:
        """A copy with some fields replaced (dataclasses.replace)."""
        return replace(self, **changes)

    def causal_allowed(self, query_index: Tensor | None = None,
                       key_index: Tensor | None = None) -> Tensor | None:
        """Bool (Nq', Nk') causal mask for the given query rows and keys (all when None)."""
        if not self.causal:
            return None
        rows = self.query_index(query_index)
        keys = self.key_index(key_index)
        return keys[None, :] <= rows[:, None] + (self.num_keys - self.num_queries)

    def pattern_allowed(self, query_index: Tensor | None = None,
                        key_index: Tensor | None = None) -> Tensor | None:
        """Bool (Nq', Nk') sparsity-pattern mask for the given query rows and keys (all when
        None)."""
        if self.pattern is None:
            return None
        return self.pattern.allowed(self.query_index(query_index), self.key_index(key_index),
                                    self.num_queries, self.num_keys)

    def selection_allowed(self, query_index: Tensor | None = None,
                          key_index: Tensor | None = None) -> Tensor | None:
        """Bool (B|1, H|1, Nq', Nk') block-selection mask for the given query rows and keys (all
        when None)."""
        if self.selection is None:
            return None
        allowed = self.selection.allowed(self.num_queries, self.num_keys, self.prepended_keys,
                                         query_index)
        return allowed if key_index is None else allowed[..., key_index]

    def with_selection_as_mask(self) -> AttentionProblem:
        """The same problem with its block selection folded into ``attn_mask`` (a bool mask ANDed;
        a float mask gets -inf outside the selected blocks), for a kernel that does not run
        selections: B H Nq Nk bools."""
        if self.selection is None:
            return self
        allowed, mask = self.selection_allowed(), self.attn_mask
        if mask is None or mask.dtype == torch.bool:
            mask = allowed if mask is None else mask & allowed
        else:
            mask = torch.where(allowed, mask, -math.inf)
        return self.with_(attn_mask=mask, selection=None)

    def with_sink_as_key(self) -> AttentionProblem:
        """The same problem with its sink logits as a key in front: a channel of ones on q, of
        zeros on k, and the key (0, s_h / scale) with a zero value, visible to every query (the
        mask gets an allowed column), so q k^T scale gives s_h exactly."""
        if self.sink_logits is None:
            return self
        heads, width = self.k.shape[1], self.k.shape[-1]
        sink_key = F.pad((self.sink_logits / self.scale).view(heads, 1, 1), (width, 0))
        zero_value = self.v.new_zeros(heads, 1, self.v.shape[-1])
        with_channel = self.with_(q=F.pad(self.q, (0, 1), value=1.0), k=F.pad(self.k, (0, 1)),
                                  sink_logits=None)
        return prepend_keys(with_channel, sink_key, zero_value,
                            allowed_in_front(self.attn_mask, 1, self.num_keys))

    def query_index(self, query_index: Tensor | None = None) -> Tensor:
        if query_index is not None:
            return query_index
        return torch.arange(self.num_queries, device=self.q.device)

    def key_index(self, key_index: Tensor | None = None) -> Tensor:
        if key_index is not None:
            return key_index
        return torch.arange(self.num_keys, device=self.q.device)


def prepend_keys(problem: AttentionProblem, keys: Tensor, values: Tensor,
                 mask: Tensor | None) -> AttentionProblem:
    """The problem with keys (H, c, D') and values (H, c, Dv) in front of its own, and ``mask``.

    Keys narrower than the problem's (D' < D: a sink logit's channel is there) get zero channels.
    """
    batch = problem.k.shape[0]

    def in_front(extra: Tensor, tokens: Tensor) -> Tensor:
        extra = F.pad(extra.to(tokens.dtype), (0, tokens.shape[-1] - extra.shape[-1]))
        return torch.cat([extra.expand(batch, -1, -1, -1), tokens], dim=-2)

    return problem.with_(k=in_front(keys, problem.k), v=in_front(values, problem.v),
                         attn_mask=mask, prepended_keys=problem.prepended_keys + keys.shape[-2])


def allowed_in_front(mask: Tensor | None, count: int, num_keys: int) -> Tensor | None:
    """The user's mask over ``num_keys`` keys with ``count`` allowed key columns in front (None
    stays None). A mask that broadcasts over the keys (key dimension 1: a 0-D mask, a per-query
    column) is expanded to ``num_keys`` first, so the padded mask covers every key."""
    if mask is None:
        return None
    mask = mask.expand(*mask.shape[:-1], num_keys)
    return F.pad(mask, (count, 0), value=True if mask.dtype == torch.bool else 0.0)

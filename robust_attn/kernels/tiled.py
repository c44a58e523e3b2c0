"""The tiled kernel: FlashAttention's tiling in eager torch ops, for what SDPA cannot compute.

Score modifiers (softcap, ALiBi) and sigmoid attention, in tiles of query rows x
keys, so no tile's memory depends on the sequence length (peak memory linear in
N) and each tile's products are large enough to run at the matmul's speed.

Forward, per tile of rows R and keys C (Dao et al. 2022, "FlashAttention",
Algorithm 1, with the running max m and sum l per row)::

    S   = score_mods(scale * Q_R K_C^T) + bias_RC        (blocked keys at -inf)
    softmax:  m' = max(m, rowmax S);  P = exp(S - m')
              l  = exp(m - m') l + rowsum P;  acc = exp(m - m') acc + P V_C
              out = acc / l,  lse = m + log l             (after the last tile)
    elementwise normalizers (sigmoid): acc += normalizer(S) V_C

Backward, per tile (Dao 2023, "FlashAttention-2", Algorithm 2, from the saved
log-sum-exp; D = rowsum(dO * O))::

    softmax:  P = exp(S - lse);  dP = dO V_C^T;  dS = P (dP - D)
    sigmoid:  W = normalizer(S);  dP = dO V_C^T;  dS = dP W (1 - W)   (autograd of the normalizer)
    dS_raw = dS through the score modifiers (autograd on the tile; identity without modifiers)
    dV_C += P^T dO;  dQ_R += scale dS_raw K_C;  dK_C += scale dS_raw^T Q_R

Causal attention (lower-right aligned, query i sees key j <= i + Nk - Nq) skips
the key tiles above the diagonal and masks only the tiles that straddle it.
Masks, the sparsity pattern and score-modifier indices are those of
:func:`robust_attn.kernels.eager.masked_logits` on the tile's rows and keys,
so every key is seen at its own index. A row with no allowed key gives zeros,
log-sum-exp -inf and zero gradients.

Sigmoid's bias b = -log(Nk) follows the whole problem's key count, not the
tile's: the normalizer is fixed to the problem's Nk before it sees a tile
(:func:`tile_normalizer`).

Not supported (``unsupported`` says why, ``auto`` moves on to chunked): dropout,
a float mask or a score modifier's captured tensor that needs gradients, and
tracing under torch.compile.

Tiles of TILE_ROWS = 256 rows x TILE_KEYS = 256 keys (all heads of the batch at
once): measured on the CPU (one thread, B=1, H=8, N=4096, D=64, causal softcap,
forward + backward), 128 to 512 rows x 128 to 1024 keys are within about 15 % of
each other, with larger tiles slower (their scores leave the cache) and smaller
ones paying Python's per-tile cost. A problem that fits one tile (a ViT's 197
tokens) runs the eager kernel itself: autograd keeps its passes (one tile's
memory) and the backward recomputes nothing. ``benchmarks/long_context.py``
measures the kernel against chunked and SDPA.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from ..problem import AttentionProblem
from .base import Kernel
from .chunked import needs_autograd
from .eager import eager_attention_with_lse, masked_logits, with_contiguous_heads

TILE_ROWS = 256
TILE_KEYS = 256
FLUSH_BELOW = 4.0


def tile_normalizer(problem: AttentionProblem) -> Callable[[Tensor], Tensor] | None:
    """The normalizer as it acts on one tile of a row, or None when it acts on whole rows only.

    Softmax acts on whole rows (the kernel computes it online instead). A normalizer that acts
    on each score on its own says so with ``elementwise(num_keys)`` (the protocol of
    :class:`robust_attn.problem.AttentionProblem`'s ``normalizer``: sigmoid attention's, whose
    bias -log(Nk) is then fixed to the whole row's Nk), so a tile's weights equal the whole
    row's. Any other normalizer: None."""
    elementwise = getattr(problem.normalizer, "elementwise", None)
    return None if elementwise is None else elementwise(problem.num_keys)


class _RowTile(NamedTuple):
    """One tile of rows [start, stop) and the key tiles its rows see: (key start, key stop,
    whether the tile straddles the causal diagonal, so needs the causal mask)."""

    start: int
    stop: int
    keys: list[tuple[int, int, bool]]


def _tiles(problem: AttentionProblem, tile_rows: int, tile_keys: int) -> list[_RowTile]:
    """The tiles of rows and keys; causal attention drops the keys no row of a tile may see
    (query i sees key j <= i + Nk - Nq)."""
    num_queries, num_keys = problem.num_queries, problem.num_keys
    offset = num_keys - num_queries
    tiles = []
    for start in range(0, num_queries, tile_rows):
        stop = min(start + tile_rows, num_queries)
        seen = min(num_keys, stop + offset) if problem.causal else num_keys
        keys = [(key, min(key + tile_keys, seen)) for key in range(0, seen, tile_keys)]
        tiles.append(_RowTile(start, stop, [(k0, k1, problem.causal and k1 - 1 > start + offset)
                                          for k0, k1 in keys]))
    return tiles


class _Logits:
    """A tile's logits: :func:`masked_logits` of its scores scale Q_R K_C^T at the tile's row and
    key indices; a tile wholly below the causal diagonal skips the causal mask."""

    def __init__(self, problem: AttentionProblem):
        self.problem, self.visible = problem, problem.with_(causal=False)
        self.rows = torch.arange(problem.num_queries, device=problem.q.device)
        self.keys = torch.arange(problem.num_keys, device=problem.q.device)

    def __call__(self, scores: Tensor, rows: _RowTile, k0: int, k1: int, straddles: bool) -> Tensor:
        """``scores`` (B*H, R, C) -> logits (B*H, R, C)."""
        batch, heads = self.problem.q.shape[:2]
        logits = masked_logits(self.problem if straddles else self.visible,
                               scores.view(batch, heads, *scores.shape[1:]),
                               self.rows[rows.start:rows.stop], self.keys[k0:k1])
        return logits.view(scores.shape)


def _exp_(x: Tensor) -> Tensor:
    """exp(x) in place, for x <= 0 (scores minus their row's max or log-sum-exp), with the weights
    below FLUSH_BELOW times the dtype's smallest normal number flushed to zero.

    The CPU's vectorised exp takes a slow path below that number's log (about -87 in float32,
    -708 in float64; -inf included): 10 to 40 times slower, measured, and ALiBi's far keys and
    every blocked key are there. So x is first raised to log(smallest normal) + 1, and what exp
    then gives below FLUSH_BELOW (4) times the smallest normal, blocked keys included, is set to
    zero: a key more than about 86 (float32) below the row's largest score gets weight 0 instead
    of less than 1e-37, which a sum of weights of at least 1 cannot see."""
    if x.device.type != "cpu":  # no slow path on GPUs
        return x.exp_()
    tiny = torch.finfo(torch.promote_types(x.dtype, torch.float32)).tiny
    return torch.nn.functional.threshold_(x.clamp_min_(math.log(tiny) + 1.0).exp_(),
                                          FLUSH_BELOW * tiny, 0.0)


def _heads(t: Tensor) -> Tensor:
    """(B, H, N, D) -> (B*H, N, D): a view of a contiguous tensor, a copy of another."""
    return t.reshape(-1, *t.shape[2:])


def _softmax_tiles(problem: AttentionProblem, tiles: list[_RowTile], out: Tensor, lse: Tensor
                   ) -> None:
    """FlashAttention's forward (module docstring) into ``out`` (B*H, Nq, Dv) and ``lse``
    (B*H, Nq)."""
    logits_of = _Logits(problem)
    q, k, v = _heads(problem.q), _heads(problem.k), _heads(problem.v)
    for rows in tiles:
        q_rows = q[:, rows.start:rows.stop] * problem.scale
        acc = out.new_zeros(out.shape[0], rows.stop - rows.start, out.shape[-1])
        row_max = row_sum = None
        for k0, k1, straddles in rows.keys:
            logits = logits_of(torch.bmm(q_rows, k[:, k0:k1].mT), rows, k0, k1, straddles)
            tile_max = logits.amax(dim=-1, keepdim=True)
            new_max = tile_max if row_max is None else torch.maximum(row_max, tile_max)
            shift = new_max.masked_fill(new_max == -math.inf, 0.0)  # an empty row: exp(-inf) = 0
            weights = _exp_(logits.sub_(shift))
            if row_max is None:
                row_sum = weights.sum(dim=-1, keepdim=True)
            else:
                rescale = (row_max - shift).exp_()
                row_sum.mul_(rescale).add_(weights.sum(dim=-1, keepdim=True))
                acc.mul_(rescale)
            acc.baddbmm_(weights, v[:, k0:k1])
            row_max = new_max
        if row_max is not None:
            out[:, rows.start:rows.stop] = acc.div_(row_sum.masked_fill(row_sum == 0, 1.0))
            lse[:, rows.start:rows.stop] = (row_max + row_sum.log()).squeeze(-1)


def _elementwise_tiles(problem: AttentionProblem, tiles: list[_RowTile], out: Tensor,
                       normalizer: Callable[[Tensor], Tensor]) -> None:
    """out = sum over key tiles of normalizer(S) V_C, into ``out`` (B*H, Nq, Dv)."""
    logits_of = _Logits(problem)
    q, k, v = _heads(problem.q), _heads(problem.k), _heads(problem.v)
    for rows in tiles:
        q_rows = q[:, rows.start:rows.stop] * problem.scale
        acc = out.new_zeros(out.shape[0], rows.stop - rows.start, out.shape[-1])
        for k0, k1, straddles in rows.keys:
            logits = logits_of(torch.bmm(q_rows, k[:, k0:k1].mT), rows, k0, k1, straddles)
            acc.baddbmm_(normalizer(logits), v[:, k0:k1])
        out[:, rows.start:rows.stop] = acc


def _tile_gradients(problem: AttentionProblem, logits_of: _Logits, scores: Tensor,
                    grad_weights: Tensor, rows: _RowTile, k0: int, k1: int, straddles: bool,
                    normalizer: Callable[[Tensor], Tensor] | None, lse: Tensor | None,
                    delta: Tensor | None) -> tuple[Tensor, Tensor]:
    """A tile's weights and the gradient of the loss by its scores scale Q_R K_C^T, from
    dP = dO V_C^T (``grad_weights``, overwritten): softmax's closed form from the row's
    log-sum-exp and D = rowsum(dO * O) (``delta``), or autograd through the elementwise
    normalizer; then autograd through the score modifiers, where there are any."""
    modified = bool(problem.score_mods)
    with torch.enable_grad():
        scores.requires_grad_(modified or normalizer is not None)
        logits = logits_of(scores, rows, k0, k1, straddles)
        if normalizer is not None:
            weights = normalizer(logits)
            return weights.detach(), torch.autograd.grad(weights, scores, grad_weights)[0]
        weights = _exp_(logits.detach() - lse)
        grad_logits = grad_weights.sub_(delta).mul_(weights)
        if not modified:
            return weights, grad_logits
        return weights, torch.autograd.grad(logits, scores, grad_logits)[0]


class _TiledAttention(torch.autograd.Function):
    """(out, lse) of the tiled forward; backward recomputes each tile (module docstring). lse is
    -inf for an elementwise normalizer's rows (it has none) and gets no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, problem, tiles):
        problem = problem.with_(q=q, k=k, v=v)
        out = q.new_zeros(*q.shape[:-1], v.shape[-1])
        lse = q.new_full(q.shape[:-1], -math.inf)
        normalizer = tile_normalizer(problem)
        if normalizer is None:
            _softmax_tiles(problem, tiles, _heads(out), _heads(lse))
        else:
            _elementwise_tiles(problem, tiles, _heads(out), normalizer)
        # D = rowsum(dO * O) needs the output for softmax only.
        ctx.save_for_backward(q, k, v, out if normalizer is None else None, lse)
        ctx.problem = problem.with_(q=q[..., :0], k=k[..., :0], v=v[..., :0])
        ctx.tiles = tiles
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        problem = ctx.problem.with_(q=q, k=k, v=v)
        logits_of = _Logits(problem)
        normalizer = tile_normalizer(problem)
        q3, k3, v3 = _heads(q), _heads(k), _heads(v)
        dq = torch.empty_like(q)
        dk, dv = torch.zeros_like(k), torch.zeros_like(v)
        dq3, dk3, dv3 = _heads(dq), _heads(dk), _heads(dv)
        # A row with no allowed key has lse = -inf: exp(S - inf) = 0 gives it zero weights.
        lse3 = _heads(lse.masked_fill(lse == -math.inf, math.inf).unsqueeze(-1))
        row_lse = delta = None
        for rows in ctx.tiles:
            q_rows = q3[:, rows.start:rows.stop] * problem.scale
            do_rows = _heads(grad_out[:, :, rows.start:rows.stop])
            dq_rows = torch.zeros_like(q_rows)
            if normalizer is None:
                row_lse = lse3[:, rows.start:rows.stop]
                delta = (do_rows * _heads(out)[:, rows.start:rows.stop]).sum(dim=-1, keepdim=True)
            for k0, k1, straddles in rows.keys:
                weights, grad_scores = _tile_gradients(
                    problem, logits_of, torch.bmm(q_rows, k3[:, k0:k1].mT),
                    torch.bmm(do_rows, v3[:, k0:k1].mT), rows, k0, k1, straddles, normalizer,
                    row_lse, delta)
                # Products into fresh tensors, then added: baddbmm_ into a slice of rows of a
                # (B*H, N, D) tensor runs one matrix product per head (several times slower).
                dv3[:, k0:k1] += torch.bmm(weights.mT, do_rows)
                dk3[:, k0:k1] += torch.bmm(grad_scores.mT, q_rows)
                dq_rows.baddbmm_(grad_scores, k3[:, k0:k1])
            dq3[:, rows.start:rows.stop] = dq_rows.mul_(problem.scale)
        return dq, dk, dv, None, None


def _solve(problem: AttentionProblem, lse: bool, tile_rows: int | None, tile_keys: int | None
           ) -> tuple[Tensor, Tensor | None]:
    for name, value in (("tile_rows", tile_rows), ("tile_keys", tile_keys)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{name}={value!r}: expected a positive number")
    problem = with_contiguous_heads(problem)
    tiles = _tiles(problem, tile_rows or TILE_ROWS, tile_keys or TILE_KEYS)
    if len(tiles) == 1 and len(tiles[0].keys) <= 1:
        # One tile (a ViT's 197 tokens): the eager kernel, whose passes autograd keeps (one
        # tile's memory), so the backward recomputes nothing.
        return eager_attention_with_lse(problem, lse=lse)
    return _TiledAttention.apply(problem.q, problem.k, problem.v, problem, tiles)


def tiled_attention_with_lse(problem: AttentionProblem, dropout_p: float = 0.0, *,
                             tile_rows: int | None = None, tile_keys: int | None = None
                             ) -> tuple[Tensor, Tensor]:
    """The output (B, H, Nq, Dv) and each row's log-sum-exp (B, H, Nq), in tiles of ``tile_rows``
    query rows x ``tile_keys`` keys (defaults TILE_ROWS, TILE_KEYS)."""
    _check_supported(problem, dropout_p)
    return _solve(problem, True, tile_rows, tile_keys)


def tiled_attention(problem: AttentionProblem, dropout_p: float = 0.0, *,
                    tile_rows: int | None = None, tile_keys: int | None = None) -> Tensor:
    """The output (B, H, Nq, Dv), in tiles (as :func:`tiled_attention_with_lse`)."""
    _check_supported(problem, dropout_p)
    return _solve(problem, False, tile_rows, tile_keys)[0]


def _check_supported(problem: AttentionProblem, dropout_p: float) -> None:
    reason = tiled_unsupported(problem, dropout_p)
    if reason is not None:
        raise ValueError(f"the tiled kernel cannot run this problem: {reason}")


def tiled_unsupported(problem: AttentionProblem, dropout_p: float) -> str | None:
    if dropout_p > 0.0:
        return "dropout is not supported (the chunked kernel computes it)"
    if torch.compiler.is_compiling():
        return "torch.compile would unroll every tile (the chunked kernel runs one block)"
    if not problem.is_softmax and tile_normalizer(problem) is None:
        return (f"normalizer {problem.normalizer!r} is not known to act elementwise (softmax and "
                f"sigmoid are)")
    if needs_autograd(problem):
        return ("a float mask or a score modifier's captured tensor needs gradients (the chunked "
                "kernel routes them)")
    return None


TILED = Kernel("tiled", tiled_attention, tiled_unsupported, run_with_lse=tiled_attention_with_lse)

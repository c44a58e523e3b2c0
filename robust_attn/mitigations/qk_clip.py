"""QK-clip: after an optimiser step, shrink the q and k weights of every head whose logits grew past tau.

The clipping half of MuonClip (Kimi Team 2025, "Kimi K2: Open Agentic
Intelligence", arXiv:2507.20534, its MuonClip section; Su Jianlin's post "QK-Clip"
describes the same rule). For each head h, with S_max^h the largest
pre-softmax logit it produced since the last step,

    S_max^h  = max over the batch and the allowed pairs (i, j) of  scale * q_i^h . k_j^h
    gamma_h  = min(1, tau / S_max^h)
    W_q^h <- sqrt(gamma_h) W_q^h,    W_k^h <- sqrt(gamma_h) W_k^h

applied to the updated weights right after the step, so that the head's logits
shrink by gamma_h and its largest one comes back to tau. The paper's choices,
kept here: the rule is per head (only heads above tau are touched, the others
keep their weights bit for bit), the split of gamma between queries and keys is
the balanced one (alpha = 1/2: sqrt(gamma) each), S_max is the signed maximum
(the paper's max of Q K^T, not the largest magnitude that one translation of Su's post
writes), the factor comes from the forward passes of the
step it follows, and tau = 100 is the threshold used for Kimi K2 (``qk_clip=True``;
a float sets another). The clip is an operation on the weights between steps: the
forward and backward passes compute what the baseline computes.

What it bounds: the factor comes from the step's forward, made with the weights
before the update, and is applied to the updated weights, so the update itself can
raise the logits past tau until the next step's clip: they stay near tau, not at or
below it. Measured on a toy task that rewards sharp attention (one layer copying the
previous token through learned positions, Adam at learning rate 0.05, 200 steps,
seeds 0-2): the largest logit of each batch after its step stays at most 1.12 tau
for tau = 100 and 1.53 tau for tau = 10, where the baseline's reaches 840-1430
(tests/test_qk_clip.py runs a shorter version).

Not from the paper (decisions of ours):

* Biases: Kimi K2 has no q/k biases. Here the bias rows of each clipped head are
  scaled by sqrt(gamma_h) with its weight rows, so q^h = W_q^h x + b_q^h (and k^h)
  scale by sqrt(gamma_h) as a whole and the head's logits by gamma_h exactly (up to
  rounding), bias or not. Leaving the biases unscaled would leave the logits'
  bias terms unclipped.
* Multi-head latent attention: the paper's MLA-specific rule (q^C, k^C by
  sqrt(gamma), the per-head rotary query q^R by gamma, the rotary key k^R shared
  across heads left alone) does not apply: every head here has its own q and k
  rows in ``qkv``, and RoPE (when on) rotates q and k after the projection, which
  commutes with scaling them. It is not implemented.
* What counts in S_max: the bilinear logits scale * q_i . k_j that the weights
  control, over the pairs the mask, causality and a sparsity pattern allow (an
  additive float mask blocks where it is -inf; its finite values are biases the
  clip cannot scale and are left out of S_max, as are score modifiers such as
  softcap's cap or ALiBi's distances). Keys prepended by sinks are left out: they are
  parameters, not projections of tokens through W_k (a sink logit's score is a
  learned s_h; a sink token's key is learned), so the clip does not scale their
  logits by gamma_h. These are the tokens' own logits, as in
  :mod:`robust_attn.logit_limit`.
* When it is measured: in training-mode forwards only (``module.train()``; grad
  mode does not matter), from the problem the kernel solved (after q/k transforms
  such as RoPE), under no_grad, in blocks of at most LOGIT_BLOCK_ELEMENTS scores, in
  float32 (float64 for a float64 module) whatever the module's dtype. Eval-mode
  forwards do not count. A maximum is idempotent, so recomputed forwards
  (activation checkpointing) change nothing.
* Non-finite maxima (an input holding nan or inf): the head is left untouched (a
  factor of 0 would erase it); the probe and the guard report such inputs.
* Data parallel: before clipping, the running maxima are reduced with MAX over
  torch.distributed's default group when it is initialised with more than one rank,
  so every replica clips by the global batch's S_max, as one process on the whole
  batch would (DDP, FSDP2: fully_shard's sharded ``qkv`` weight is scaled on its
  shards). This is a collective: every rank must call the step. DDP broadcasts module
  buffers from rank 0 at every forward unless built with ``broadcast_buffers=False``;
  with several forwards per step (gradient accumulation) build it so: otherwise each
  forward starts from rank 0's running maximum, and the other ranks' earlier
  micro-batches are lost (documented, not tested).

The weights: W_q^h and W_k^h are rows [h D, (h + 1) D) and attn_dim + [h D, (h + 1) D)
of the host's ``qkv`` layer, which the after-step stage receives with the host's other
layers (``layers["qkv"]``): this mitigation builds no layer and keeps no reference to
one, so it clips whatever qkv the host holds (the default nn.Linear, a converted timm
model's; timm state dicts load strictly). It combines with spectral_qk (both act on the
same qkv: the clip scales M_h = W_k^h W_q^h^T by gamma_h).

Use: ``robust_attn.attach_to_optimizer(model, optimizer)`` once, or
``robust_attn.after_optimizer_step(model)`` after each ``optimizer.step()``. The
running maximum lives in the buffer ``max_logit`` (H,), float32, -inf when no
training forward has run since the last step; it is not saved in state dicts
(persistent=False), and it restarts at -inf after the step, after ``reset_parameters``
and after ``reset_from_weights`` (call it after loading weights into a module built on
the meta device: ``to_empty`` leaves the buffer uninitialised).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..claim import ENTROPY, RANK, Claim, witnesses_at
from ..config import AttentionConfig
from ..kernels.eager import attention_logits
from ..problem import AttentionProblem
from .base import HostLayers, Mitigation

if TYPE_CHECKING:
    from ..call import Attended, AttentionCall

DEFAULT_TAU = 100.0  # Kimi K2's threshold
# At most this many scores (B x H x rows x Nk) are materialised at once while measuring S_max:
# 16 MiB in float32 (our choice).
LOGIT_BLOCK_ELEMENTS = 2 ** 22


def _bare_problem(problem: AttentionProblem) -> AttentionProblem:
    """``problem`` with what the clip cannot scale taken out: no score modifiers, a float mask
    reduced to where it blocks (-inf), q and k in float32 at least."""
    dtype = torch.promote_types(problem.q.dtype, torch.float32)
    mask = problem.attn_mask
    if mask is not None and mask.dtype != torch.bool:
        mask = mask != -math.inf
    return problem.with_(q=problem.q.to(dtype), k=problem.k.to(dtype), score_mods=(),
                         attn_mask=mask)


@torch.no_grad()
def head_max_logits(problem: AttentionProblem,
                    block_elements: int = LOGIT_BLOCK_ELEMENTS) -> Tensor:
    """S_max per head, (H,) float32: the largest scale * q_i . k_j over the batch and the pairs
    the mask, causality and the pattern allow, the prepended keys left out (module docstring);
    -inf for a head with no allowed pair. Computed in blocks of query rows of at most
    ``block_elements`` scores."""
    bare = _bare_problem(problem)
    batch, heads, queries, _ = bare.q.shape
    keys, prepended = bare.num_keys, bare.prepended_keys
    result = torch.full((heads,), -math.inf, dtype=torch.float32, device=bare.q.device)
    if batch == 0 or queries == 0 or keys == prepended:
        return result
    rows_per_block = max(1, block_elements // (batch * heads * keys))
    if rows_per_block >= queries:  # one block: every row, without gathering them
        return attention_logits(bare)[..., prepended:].amax(dim=(0, 2, 3)).float()
    for start in range(0, queries, rows_per_block):
        rows = torch.arange(start, min(start + rows_per_block, queries), device=bare.q.device)
        logits = attention_logits(bare, rows)[..., prepended:]
        result = torch.maximum(result, logits.amax(dim=(0, 2, 3)).float())
    return result


def clip_factors(max_logit: Tensor, tau: float) -> Tensor:
    """gamma_h = tau / S_max^h where S_max^h > tau (finite), else 1: the factor of head h's logits."""
    max_logit = max_logit.float()
    clipped = torch.isfinite(max_logit) & (max_logit > tau)
    return torch.where(clipped, tau / max_logit, torch.ones_like(max_logit))


def qk_row_factors(gamma: Tensor, head_dim: int) -> Tensor:
    """The factor of each of qkv's 3 H D output rows: sqrt(gamma_h) on head h's query and key
    rows, 1 on the value rows."""
    root = gamma.sqrt().repeat_interleave(head_dim)
    return torch.cat([root, root, torch.ones_like(root)])


def _scale_rows_(tensor: Tensor, factors: Tensor) -> None:
    """tensor[r] *= factors[r] in place, for a plain tensor or a DTensor (FSDP2's shards: the
    factors are laid out as the tensor is, without communication)."""
    factors = factors.to(device=tensor.device, dtype=tensor.dtype)
    factors = factors.view(-1, *([1] * (tensor.dim() - 1)))
    if dist.is_available():
        from torch.distributed.tensor import DTensor, distribute_tensor

        if isinstance(tensor, DTensor):
            factors = distribute_tensor(factors, tensor.device_mesh, tensor.placements,
                                        src_data_rank=None)
    tensor.mul_(factors)


@torch.no_grad()
def clip_qk_(qkv: nn.Linear, max_logit: Tensor, tau: float, num_heads: int) -> Tensor:
    """Apply QK-clip to ``qkv``'s weight (and bias) in place from the per-head maxima; returns
    gamma (H,). Heads at or below tau (or non-finite) are multiplied by exactly 1."""
    gamma = clip_factors(max_logit, tau)
    factors = qk_row_factors(gamma, qkv.out_features // (3 * num_heads))
    _scale_rows_(qkv.weight, factors)
    if qkv.bias is not None:
        _scale_rows_(qkv.bias, factors)
    return gamma


def _data_parallel() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class QKClip(Mitigation):
    """``qk_clip=True`` (tau = 100) or a threshold tau > 0: per-head QK-clip after each
    optimiser step (module docstring). Needs ``robust_attn.attach_to_optimizer(model, opt)`` or
    ``robust_attn.after_optimizer_step(model)``: without either the running maximum is measured
    but nothing is clipped."""

    option = "qk_clip"
    advice_preset = "qk_clip"
    advice = {"logit_growth": (3, "QK-clip rescales W_q, W_k of the heads whose logits pass tau "
                                  "after each step (Kimi K2); attach it to the optimizer")}
    # Kimi K2's QK-clip at tau = 100; acts in training, after optimiser steps.
    presets = {"qk_clip": {"qk_clip": True}}
    conflicts = {
        "qk_norm": "qk_norm normalises q and k per token after W_q and W_k, so rescaling their "
                   "rows leaves the logits as they were (LayerNorm is scale invariant): qk_clip "
                   "would shrink W_q and W_k at every step without bounding anything",
        "sigma_reparam": "sigma_reparam's W_hat = gamma W / sigma(W) does not change when W is "
                         "rescaled, so qk_clip's rescaling of W_q and W_k would do nothing",
    }
    claims = (Claim(
        "qk_clip", "Kimi Team 2025 (Kimi K2, arXiv:2507.20534; MuonClip's QK-Clip)",
        "rescaling a head's W_q and W_k after each optimiser step whenever its largest logit "
        "exceeds tau = 100 keeps the attention logits bounded in training (no logit explosion, "
        "no loss spikes); no claim about collapse at initialisation",
        note="Measured: as the baseline at initialisation. The clip changes the weights only "
             "between optimiser steps, so a module as built is the baseline's (the same weights "
             "from the same seed, the same forward: identical health at every point of the "
             "table): rank collapse in attention-only stacks, entropy collapse at large QK "
             "scales (the witnesses). Even clipping at initialisation would not help: in the "
             "table's sqk-16 stacks (largest logits 410-450), five rounds of "
             "after_optimizer_step without a weight update bring every layer's largest logit to "
             "100 and lift the worst-layer H only from 0.01 to 0.04 (seed 0, with and without "
             "residual): tau = 100 is far above the logits at which rows go one-hot. Its "
             "claim is about training: it bounds logit explosion, not entropy collapse.",
        witnesses=witnesses_at("qk_clip", RANK, ENTROPY),
    ),)

    def __init__(self, config: AttentionConfig, tau: float) -> None:
        super().__init__()
        self.tau = tau
        self.num_heads = config.num_heads
        self.register_buffer("max_logit", torch.full((config.num_heads,), -math.inf,
                                                      dtype=torch.float32,
                                                      device=config.device), persistent=False)

    @classmethod
    def from_option(cls, value: Any, config: AttentionConfig) -> QKClip | None:
        if value is None or value is False:
            return None
        if value is True:
            return cls(config, DEFAULT_TAU)
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or not math.isfinite(value) or value <= 0):
            raise ValueError(f"qk_clip={value!r}: expected True (tau = {DEFAULT_TAU:g}), a "
                             f"threshold tau > 0 such as 100.0, False or None")
        return cls(config, float(value))

    def transform_output(self, attended: Attended, call: AttentionCall) -> Tensor:
        if self.training:
            block = head_max_logits(attended.problem)
            torch.maximum(self.max_logit, block.to(self.max_logit.dtype), out=self.max_logit)
        return attended.out

    @torch.no_grad()
    def after_optimizer_step(self, layers: HostLayers) -> None:
        """Clip the heads whose running maximum exceeds tau in the host's qkv, then restart the
        maximum at -inf."""
        if _data_parallel():
            dist.all_reduce(self.max_logit, op=dist.ReduceOp.MAX)
        clip_qk_(layers["qkv"], self.max_logit, self.tau, self.num_heads)
        self.max_logit.fill_(-math.inf)

    def _apply(self, fn, recurse: bool = True):
        """nn.Module._apply (behind .to(), .half(), .cuda(), ...), keeping ``max_logit`` in
        float32: it moves with the module, its dtype stays (a float16 copy would hold logits
        above 65504 as inf, a bfloat16 one only 3 significant digits)."""
        before = self._buffers["max_logit"]
        super()._apply(fn, recurse)
        after = self._buffers["max_logit"]
        if after.dtype != torch.float32:
            self._buffers["max_logit"] = before.to(after.device)
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Restart the running maximum (RobustAttention.reset_parameters calls it; also after
        ``to_empty``, which leaves the buffer uninitialised)."""
        self.max_logit.fill_(-math.inf)

    def reset_from_weights(self, layers: HostLayers) -> None:
        """New weights: the maximum measured with the old ones no longer applies."""
        self.reset_parameters()

    def keeps_function(self, source: nn.Module) -> bool:
        return True  # converted weights load into a plain nn.Linear; the clip acts in training

    def timm_expressible(self, host: nn.Module) -> bool:
        return True  # plain weights: the clip changes them only between steps

    def extra_repr(self) -> str:
        return f"tau={self.tau:g}"

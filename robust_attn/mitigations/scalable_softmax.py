"""Scalable-Softmax (SSMax): softmax whose logits are multiplied by s log n, n the row's key count.

    SSMax(z)_i = n^(s z_i) / sum_j n^(s z_j) = exp((s log n) z_i) / sum_j exp((s log n) z_j)

Nakanishi (2025), "Scalable-Softmax Is Superior for Attention" (arXiv:2501.19399). The
largest weight of a softmax over n logits goes to 0 as n grows (the paper's "attention
fading"); multiplying the logits by s log n keeps a logit that stands out by a margin on top
however long the row, which the paper finds improves long-context modelling and length
generalisation. z is the attention logit (here scale * q_i . k_j); s is a learnable scalar,
one per layer and head (per layer: one module per layer). SSMax amounts to multiplying the
query by s log n, which leaves the softmax and every kernel as they are; so does
:meth:`ScalableSoftmax.transform_qk`: q_i <- s_h log(n_i) q_i. A float mask's values are added
after the scaling: they are biases, not logits.

What we could read: the stored copy of the paper holds its abstract, introduction and Figure
1's caption (SSMax keeps the top weight near 1 where softmax's falls, with s = 0.43); the
formula above, s per layer and head, and the query scaling come from third-party summaries of
its method section (and agree with what we recall of it), not from the paper's own text.

``scalable_softmax=`` one of:

    True      s_h = PAPER_SCALE = 0.168 for every head: 1 / (mean of log n over n = 1..1024),
              so that over a causal 1024-token context (the training length we recall from the
              paper) the logits are multiplied by 1 on average at initialisation. We recall this
              value from the paper's experimental setup but could not read it there (nor whether
              the initial value differs between training from scratch and replacing softmax in a
              pretrained model): check it against the paper before relying on it.
    a float   the initial s_h of every head, in [-MAX_SCALE, MAX_SCALE] = [-100, 100] (our
              bound: s log n then stays finite in float16, whose largest value is 65504, for
              every n below 2^31, 100 * log(2^31) = 2150; s = 100 already makes a row one-hot
              for logit gaps of 0.1). 1.0 gives softmax(log(n) z), which third-party code
              describes as the paper's variant without a learned scale.

No bias: SSMax as proposed has none. By the same summaries, the paper arrives at it from a fit
of (s p_n + b) z with a learned b per layer and head, and tests a variant with the bias, which
trained faster but generalised worse in length; we could not read those sections. A bias would
be one more (H,) parameter here.

n is, per query row, the number of keys that query may attend, counted from the call:

* no mask, not causal: every query sees all Nk keys, n = Nk;
* causal (lower-right aligned, as the kernels): query i sees keys j <= i + (Nk - Nq), so
  n_i = i + 1 + (Nk - Nq) clamped to [0, Nk] (i + 1 in self-attention);
* a mask (4-D, broadcastable to (B, H, Nq, Nk), as AttentionCall carries it): the allowed keys
  of the row, True for a bool mask, > -inf for a float mask (a finite fill such as
  torch.finfo(dtype).min is an additive value to this library, so it counts as allowed), and
  within the causal triangle when both apply. Per batch and head when the mask has those
  dimensions.

**Sparsity and block_topk: a documented deviation.** The paper's n is the size of the softmax's
input vector, the keys the row's softmax runs over. A sparsity pattern (``sparsity=``) or
block_topk's selection also restricts those keys, but n here counts only the mask and causality:
this stage (transform_qk) runs before the problem exists, and the pattern's or the selection's
keys per row are known only there (block_topk's only after scoring). So with either, n is the
row's keys before the restriction (log n larger than the paper's by log(n / kept keys)): the
function stays what it is at every length (no leak), but it is not the paper's SSMax over the
kept keys. Counting the kept keys needs a problem-stage hook that both sparsity and block_topk
expose (not done: those files belong elsewhere). tests/test_scalable_softmax.py pins this.

Initial s: checked again (this session) and still not verified: the stored copy of the paper
(arXiv 2501.19399v1, html) ends after the introduction, and no stored page or code quotes the
initial value the paper uses; third-party implementations default to 0.43 (Figure 1's s) or 1.0.

A row with n <= 1 gets log 1 = 0: its one key takes all the weight anyway, and a row with no
allowed key (n = 0, output zero or the sinks') gets q = 0 instead of log 0 = -inf.

Sinks: keys prepended by sink_tokens or sink_logit (extend_keys, after this stage) are not
counted in n: n is the number of the tokens' own keys a query may attend. The sink tokens'
scores are scaled with the rest, since scale (s log n) q . k_sink uses the scaled q; the sink
logit's score s_sink is not (it enters through a channel added after this stage), so with
sink_logit the row computes softmax([s_sink, (s log n) z_1, ..., (s log n) z_n]).

Order: after q_norm / k_norm (a normalisation would undo the scaling otherwise), and RoPE
commutes with it (a rotation of q). Health: ``scale``, s per head, and for a call the mean
multiplier s log n over the query rows, per head (``multiplier``; above 1 the logits are
sharpened, below 1 softened).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..claim import ENTROPY, RANK, Claim, witness_at
from ..config import AttentionConfig
from ..problem import allowed_key_counts
from .base import HostLayers, Mitigation

if TYPE_CHECKING:
    from ..call import AttentionCall

# 1 / mean(log n, n = 1..1024) = 1024 / log(1024!) = 0.1685 (module docstring: recalled, unverified)
PAPER_CONTEXT = 1024
PAPER_SCALE = PAPER_CONTEXT / math.lgamma(PAPER_CONTEXT + 1)
MAX_SCALE = 100.0


def log_key_counts(num_queries: int, num_keys: int, attn_mask: Tensor | None, is_causal: bool,
                   device: torch.device, dtype: torch.dtype) -> Tensor:
    """log n per query row (n = :func:`allowed_key_counts`, at least 1), of ``dtype``: (B', H',
    Nq or 1, 1), or 0-D when every row has all ``num_keys`` keys (a tensor, not math.log, so that
    a compiled module keeps the length symbolic instead of compiling a graph per length)."""
    counts = allowed_key_counts(num_queries, num_keys, attn_mask, is_causal, device)
    if counts is None:
        counts = torch.ones((), dtype=dtype, device=device) * num_keys
    return torch.log(counts.clamp(min=1).to(dtype))


class ScalableSoftmax(Mitigation):
    """``scalable_softmax=True | s``: q_i <- s_h log(n_i) q_i, with a learned ``scale`` s (H,)."""

    option = "scalable_softmax"
    presets = {"scalable_softmax": {"scalable_softmax": True}}
    conflicts = {"sigmoid": "scalable-softmax rescales softmax logits by s log n; sigmoid "
                            "attention has no softmax"}
    claims = (
        Claim(
            "scalable_softmax", "Nakanishi 2025 (Scalable-Softmax, arXiv 2501.19399)",
            "multiplying the logits by s log n keeps attention from fading (flattening) as the "
            "number of keys grows; no claim about collapse at initialisation",
            note="Measured: neither. At initialisation (s = 0.168) the multiplier s log n is "
                 "0.35 at 8 tokens, 0.70 at 64, 0.93 at 256 and 1.17 at 1024: it softens the "
                 "logits below e^(1 / s) = 378 keys and sharpens them beyond. Where the baseline "
                 "collapses in entropy (sqk 14-32, 8-32 tokens) so does it: 60 of 60 random draws "
                 "of that setting end below H = 0.1 (highest 0.037), and at the table's sqk-16 "
                 "points its worst-layer H is 0.016 without residual connections and 0.013 with "
                 "(baseline 0.011, 0.009); the entropy witness is the baseline's own point. The "
                 "softening only moves the onset a little (64 tokens, depth 8, 4 heads of width "
                 "16, residual: sqk 6 collapses the baseline, H 0.090, not SSMax, 0.135; sqk 8 "
                 "collapses both), and at 1024 tokens it is the sharper (H 0.216 against 0.264 "
                 "at sqk 4). With s = 1 (the paper's variant without a learned scale) the "
                 "multiplier is log n, above 1 from 3 keys on, and it causes entropy collapse "
                 "where the baseline has none: sqk 4, 64 to 1024 tokens, H 0.02-0.04 against "
                 "0.23-0.26 (tested at 64 tokens). Not against rank collapse: attention-only "
                 "stacks lose rank as the baseline's do (res about 1e-7).",
            witnesses={RANK: witness_at("scalable_softmax", RANK),
                       ENTROPY: witness_at("scalable_softmax", ENTROPY)},
        ),
    )

    def __init__(self, initial: float, config: AttentionConfig):
        super().__init__()
        self.initial = float(initial)
        self.scale = nn.Parameter(torch.full((config.num_heads,), self.initial,
                                             **config.factory_kwargs))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """s back at its initial value (after ``to_empty`` on the meta device)."""
        self.scale.fill_(self.initial)

    @classmethod
    def from_option(cls, value: Any, config: AttentionConfig) -> ScalableSoftmax | None:
        if value is None or value is False:
            return None
        if value is True:
            return cls(PAPER_SCALE, config)
        if (isinstance(value, (int, float)) and not isinstance(value, bool)
                and math.isfinite(value) and -MAX_SCALE <= value <= MAX_SCALE):
            return cls(float(value), config)
        raise ValueError(f"scalable_softmax={value!r}: expected True (s starts at "
                         f"{PAPER_SCALE:.3f}), an initial s in [{-MAX_SCALE:g}, {MAX_SCALE:g}] "
                         f"such as 1.0, or None")

    def multipliers(self, q: Tensor, k: Tensor, call: AttentionCall) -> Tensor:
        """s_h log(n_i), broadcastable to q (B, H, Nq, D): (B' or 1, H, Nq or 1, 1)."""
        dtype = torch.promote_types(q.dtype, torch.float32)
        log_n = log_key_counts(q.shape[-2], k.shape[-2], call.attn_mask, call.is_causal,
                               q.device, dtype)
        return self.scale.view(1, -1, 1, 1) * log_n

    def transform_qk(self, q: Tensor, k: Tensor, call: AttentionCall) -> tuple[Tensor, Tensor]:
        # cast to q's dtype: a float32 scale must not promote a bfloat16 q (kernels need one dtype)
        return q * self.multipliers(q, k, call).to(q.dtype), k

    def health(self, layers: HostLayers, call: AttentionCall | None = None) -> dict[str, Tensor]:
        scale = self.scale.detach().float()
        health = {"scale": scale}
        if call is not None and call.x is not None:
            tokens = call.x.shape[-2]
            log_n = log_key_counts(tokens, tokens, call.attn_mask, call.is_causal, call.x.device,
                                   torch.float32)
            # (B', H, Nq or 1, 1): a mean over a broadcast dimension is the mean over its rows
            health["multiplier"] = (scale.view(1, -1, 1, 1) * log_n).mean(dim=(0, 2, 3))
        return health

    def extra_repr(self) -> str:
        return f"initial={self.initial:.4g}"

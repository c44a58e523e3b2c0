"""Differential attention: the difference of two softmax maps, each head's output RMS-normalised.

    [q1 | q2] = q_h,  [k1 | k2] = k_h                        (the two halves of each head, D / 2 wide)
    A1 = softmax(q1 k1^T / sqrt(D / 2)),  A2 = softmax(q2 k2^T / sqrt(D / 2))
    out_h = (1 - lambda_init) * SubLN((A1 - lambda A2) v_h)  (v_h whole: D wide)
    lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init
    lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1))                (l: the layer index, from 1)

Ye et al. (2024), "Differential Transformer" (ICLR 2025, arXiv:2410.05258): subtracting a
second softmax map cancels the attention both maps put on irrelevant context ("attention
noise"), as a differential amplifier cancels common-mode noise, and promotes sparse
attention; they report better key-information retrieval and fewer activation outliers.
SubLN is an RMSNorm over each head's D channels (eps 1e-5, one learned gain of
D entries shared by the heads: their "GroupNorm", i.e. a norm per head), and the fixed
(1 - lambda_init) aligns its gradient flow with plain attention's. lambda is one
learned scalar per layer, shared by its heads, re-parametrised through four vectors of
D / 2 entries drawn N(0, 0.1^2).

Heads and widths. ``num_heads`` is the number of differential heads (of the subtracted
pairs), and each has the module's full head width D = dim / num_heads: its q and k are
split into halves, its v is not. This is timm's ``DiffAttention(dim, num_heads)``
exactly: timm's ``head_dim`` is the half width D / 2 (q and k are viewed as 2 H heads of
width D / 2, v as H heads of width D), and its q/k half-heads 2h and 2h + 1 are the first
and second half of our head h, so the qkv and proj weights map one to one with no
permutation. (The paper compares a Diff Transformer with h heads to a Transformer with 2h:
same parameters, halved head count.)

Option ``differential=``:

    True     layer index l = 1: lambda_init = 0.2 (timm's default ``depth=0``)
    l >= 1   layer index l (the paper's, from 1): lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1));
             timm's ``depth`` argument and the official code's are l - 1 (timm's ViT passes its
             0-based block index), so a timm DiffAttention built with ``depth=d`` is
             ``differential=d + 1``. True is 1, as in Python (True == 1).

The head width must be even. State (timm's names under ``mitigations.differential``):
``lambda_q1``, ``lambda_k1``, ``lambda_q2``, ``lambda_k2`` (D / 2,) and ``sub_norm.weight``
(D,). Health: ``lambda``, the current lambda (per head: the same value for every head).

How it runs (the attend stage): two problems built from the module's own, each the
queries' and keys' half with the whole v, the same mask, causality, sparsity pattern and
score modifiers (softcap caps each map's logits), and the scale multiplied by sqrt(2)
(1 / sqrt(D) -> 1 / sqrt(D / 2), the paper's scale), each solved by the module's kernel
choice (``AttentionCall.attend``, with the call's attention dropout: independent masks per
map, as timm's fused path). No N x N matrix is materialised on a fused kernel: A1 v and
A2 v are two kernel calls (as the official ``multihead_flashdiff_1``), and SDPA pads the
half-width q and k to v's width, so each costs a full-width attention: a forward at ViT-S
shape (B 8, N 197, C 384, H 6; float32, no grad, CPU, 1 thread) took 62.5 ms against the
baseline's 23.0 (2.7x, medians of 15). A row with no allowed key gives A1 v = A2 v = 0, hence 0 after
SubLN. The probe measures the first map's problem (A1: a softmax over the allowed keys that
the module computes; A1 - lambda A2 is no distribution), and the head outputs as returned.
An observer that asks for the log-sum-exp (``register_observer(lse=True)``) gets None: the
difference of two maps has no single normaliser.

Conflicts (refused at construction): ``sigmoid`` and any option that replaces the softmax
(the paper's difference of two maps, and lambda_init's scale, assume two distributions over
the keys, rows summing to one, so that their common part cancels); ``sink_logit`` and
``sink_tokens`` (a score-level sink lets a head put its mass on nothing so that its output is
near zero, but SubLN rescales every head's output to unit RMS, undoing it, and differential
attention cancels unneeded mass its own way, by the subtraction; mechanically, a sink logit
is an extra q/k channel at the full head's scale and a sink key lives in the full head's
key space, neither of which splits into the two half-width maps); ``outlier_removal`` (it
subtracts the uniform attention U V from the output of a row-stochastic attention; here the
output is RMS-normalised and the map's rows sum to 1 - lambda); ``rope`` (RoPE rotates
channel pairs of the whole head: with ``rotate_half`` a pair straddles the two halves, so
q1 k1^T would no longer depend on positions through their difference only, and interleaved,
each half would get half of the head's frequencies; the official code rotates each half-head
with all of them).

qk_norm combines: it normalises the whole head (D) before the split, whereas timm's
``DiffAttention(qk_norm=True)`` normalises each half-head (D / 2) on its own.

Where timm 1.0.31 and the official code (microsoft/unilm, Diff-Transformer/multihead_diffattn.py)
differ, and what this module does:

* lambda and its init: the same in both (timm's ``dual_lambda=True``, two scalars, is timm's
  own and is not supported here). timm and the official code create the four vectors in float32
  whatever the module's dtype; here they follow the module's dtype (computed in float32 or
  wider).
* SubLN: the official RMSNorm computes in float32 and casts back (then multiplies by the gain);
  timm's RmsNorm computes in the input's dtype. Here: in float32 or wider, the gain applied
  before casting back. All agree in float32.
* lambda's dtype: the official code casts exp(.) to q's dtype before adding lambda_init; timm
  adds in float32 and casts the sum. Here: timm's.
* Masks: the official code is causal when given no mask and applies nan_to_num to the logits;
  timm (and this module) take ``attn_mask`` / ``is_causal``. A per-head mask (H heads) works on
  timm's fused path only: its unfused path broadcasts the mask over the 2 H half-head maps (a
  mask of H heads fails there). Here a mask broadcasts over the H heads, the same for both maps.
  A query with no allowed key: 0 here on every kernel; timm's unfused path gives nan (a
  softmax of -inf), its fused path what SDPA gives (0 on the CPU, measured with torch 2.14).
* The official code has no attention dropout, bias-free projections, RoPE on each half-head and
  grouped-query attention (``num_kv_heads``); timm has attention dropout (per map), optional
  biases, no RoPE and no GQA, and adds qk_norm and scale_norm (whose ``norm_layer`` defaults to
  RmsNorm in DiffAttention, LayerNorm in RobustAttention).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..call import Attended
from ..claim import ENTROPY, RANK, Claim, witnesses_at
from ..config import AttentionConfig
from ..problem import AttentionProblem
from .base import HostLayers, Mitigation

if TYPE_CHECKING:
    from ..call import AttentionCall

LAMBDA_INIT_STD = 0.1
SUB_NORM_EPS = 1e-5


def lambda_init_at(layer: int) -> float:
    """The paper's lambda_init for layer index ``layer`` (from 1): 0.8 - 0.6 exp(-0.3 (l - 1))."""
    return 0.8 - 0.6 * math.exp(-0.3 * (layer - 1))


def layer_of_lambda_init(lambda_init: float) -> int:
    """The layer index l (from 1) whose lambda_init is ``lambda_init``: a timm DiffAttention's
    ``differential=`` value (timm keeps ``lambda_init``, not its ``depth``). ValueError when no
    integer layer gives it (a lambda_init set by hand)."""
    if not 0.2 - 1e-12 <= lambda_init < 0.8:
        raise ValueError(f"lambda_init={lambda_init!r} is no layer's: 0.8 - 0.6 exp(-0.3 (l - 1)) "
                         f"lies in [0.2, 0.8) for l >= 1")
    layer = 1 + round(-math.log((0.8 - lambda_init) / 0.6) / 0.3)
    if not math.isclose(lambda_init_at(layer), lambda_init, rel_tol=1e-9, abs_tol=1e-12):
        raise ValueError(f"lambda_init={lambda_init!r} is no integer layer's (nearest: layer "
                         f"{layer}, {lambda_init_at(layer)!r})")
    return layer


class SubLayerNorm(nn.Module):
    """RMSNorm over the last dimension with a learned gain ``weight``, computed in float32 or
    wider: x / sqrt(mean(x^2) + eps) * weight (the paper's per-head norm; timm's RmsNorm)."""

    def __init__(self, width: int, eps: float = SUB_NORM_EPS, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width, device=device, dtype=dtype))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = wide * torch.rsqrt(wide.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return (normed * self.weight).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class Differential(Mitigation):
    """Option ``differential``: True (layer 1) or a layer index l >= 1 (module docstring)."""

    option = "differential"
    head_dim_multiple = 2  # q and k split into two halves per head
    # Ye et al. 2024's differential attention, lambda_init of the first layer (0.2): a module
    # built alone does not know its depth (pass differential=l for layer l).
    presets = {"differential": {"differential": True}}
    conflicts = {
        "sigmoid": "differential attention subtracts two softmax maps, distributions over the "
                   "keys whose common part cancels; sigmoid attention replaces the softmax",
        "sink_logit": "a sink lets a head attend to nothing, but differential attention "
                      "RMS-normalises every head's output (undoing it) and cancels unneeded "
                      "mass by subtracting its second map; and the sink's extra q/k channel, "
                      "at the whole head's scale, does not split into the two half-width maps",
        "sink_tokens": "a sink lets a head attend to nothing, but differential attention "
                       "RMS-normalises every head's output (undoing it) and cancels unneeded "
                       "mass by subtracting its second map; and sink keys live in the whole "
                       "head's key space, which the two maps split in halves",
        "outlier_removal": "outlier removal subtracts the uniform attention U V from a "
                           "row-stochastic attention's output; differential attention's rows "
                           "sum to 1 - lambda and its output is RMS-normalised per head",
        "rope": "RoPE rotates channel pairs of the whole head: rotate_half pairs straddle the "
                "two halves (q1 k1^T would not depend on positions through their difference "
                "only), interleaved ones give each half half the frequencies; Diff Transformer "
                "rotates each half-head with all of them",
    }
    claims = (Claim(
        "differential", "Ye et al. 2024, ICLR 2025 (Differential Transformer)",
        "subtracting a second softmax map cancels attention noise and promotes sparse "
        "attention; fewer activation outliers; no claim about collapse at initialisation",
        note="Measured: neither (the table's stacks, 5 seeds). Each map is a softmax of "
             "half-head logits at the half-head scale, as large as the baseline's, so at sqk 16 "
             "the first map (what the probe measures) goes one-hot as the baseline's does: "
             "worst-layer H 0.007-0.012 (baseline 0.008-0.013), with or without residual. At "
             "sqk 1 both maps are near uniform, A1 - lambda A2 is near (1 - lambda) times the "
             "mean token, and the per-head RMSNorm rescales each token without separating "
             "them: attention-only stacks end at res(X) 1.3e-7 to 1.5e-7 (baseline 1.2e-7 to "
             "1.4e-7). Attention only at sqk 16 the tokens keep res(X) 0.91-0.92 where the "
             "baseline's collapse (2e-7): each output is the difference of two one-hot rows' "
             "values, normalised per head; not a guarantee, since the same stacks collapse in "
             "rank at sqk 1. With residual at sqk 1, res(X) 0.39-0.41 (baseline 0.81-0.89): "
             "the normalised head outputs weigh more against the residual stream.",
        witnesses=witnesses_at("differential", RANK, ENTROPY),
    ),)

    def __init__(self, layer: int, config: AttentionConfig):
        super().__init__()
        self.layer = layer
        self.lambda_init = lambda_init_at(layer)
        self.num_heads = config.num_heads
        half = config.head_dim // 2
        factory = config.factory_kwargs
        self.lambda_q1 = nn.Parameter(torch.empty(half, **factory))
        self.lambda_k1 = nn.Parameter(torch.empty(half, **factory))
        self.lambda_q2 = nn.Parameter(torch.empty(half, **factory))
        self.lambda_k2 = nn.Parameter(torch.empty(half, **factory))
        self.sub_norm = SubLayerNorm(config.head_dim, **factory)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The four lambda vectors drawn N(0, 0.1^2), as timm and the official code (the sub
        norm's gain resets itself)."""
        for vector in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(vector, mean=0.0, std=LAMBDA_INIT_STD)

    @classmethod
    def from_option(cls, value: Any, config: AttentionConfig) -> Differential | None:
        if value is None or value is False:
            return None
        if value is True:
            return cls(1, config)
        if isinstance(value, int) and value >= 1:
            return cls(int(value), config)
        raise ValueError(f"differential={value!r}: expected True (layer 1), a layer index >= 1 "
                         f"(the paper's l; timm's depth + 1) or None")

    def saved_value(self) -> int:
        return self.layer  # lambda_init: part of the function, not of the state dict's tensors

    def lambda_full(self) -> Tensor:
        """lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init, a
        0-d tensor in float32 (or the parameters' dtype when wider)."""
        dtype = torch.promote_types(self.lambda_q1.dtype, torch.float32)
        first = torch.exp(torch.sum(self.lambda_q1.to(dtype) * self.lambda_k1.to(dtype)))
        second = torch.exp(torch.sum(self.lambda_q2.to(dtype) * self.lambda_k2.to(dtype)))
        return first - second + self.lambda_init

    def attend(self, problem: AttentionProblem, call: AttentionCall) -> Attended:
        q1, q2 = problem.q.chunk(2, dim=-1)
        k1, k2 = problem.k.chunk(2, dim=-1)
        scale = problem.scale * math.sqrt(2.0)  # 1 / sqrt(D) -> 1 / sqrt(D / 2)
        first = call.attend(problem.with_(q=q1, k=k1, scale=scale))
        second = call.attend(problem.with_(q=q2, k=k2, scale=scale))
        lam = self.lambda_full().to(first.out.dtype)
        out = self.sub_norm(first.out - lam * second.out) * (1.0 - self.lambda_init)
        kernel = first.kernel if first.kernel == second.kernel else \
            f"{first.kernel}+{second.kernel}"
        return Attended(first.problem, out, None, kernel)

    def health(self, layers: HostLayers, call: AttentionCall | None = None) -> dict[str, Tensor]:
        return {"lambda": self.lambda_full().detach().reshape(1).repeat(self.num_heads)}

    def keeps_function(self, source: nn.Module) -> bool:
        """True for a timm DiffAttention (the paper's lambda vectors, not dual_lambda) with this
        module's lambda_init: convert copies its lambda vectors and sub norm."""
        lambda_init = getattr(source, "lambda_init", None)
        return (getattr(source, "lambda_q1", None) is not None
                and isinstance(getattr(source, "sub_norm", None), nn.Module)
                and isinstance(lambda_init, float)
                and math.isclose(lambda_init, self.lambda_init, rel_tol=1e-9, abs_tol=1e-12))

    def timm_expressible(self, host: nn.Module) -> bool:
        """timm's Attention cannot hold it; timm's DiffAttention can, when the module came from
        one (convert records ``timm_origin.kind``)."""
        return getattr(getattr(host, "timm_origin", None), "kind", None) == "DiffAttention"

    def extra_repr(self) -> str:
        return f"layer={self.layer}, lambda_init={self.lambda_init:.6g}"

"""Softmax attention with a per-head sink logit on the CPU's fused (flash) SDPA, by the row lse.

A sink logit s_h is one more key with score s_h and a zero value (gpt-oss, OpenAI 2025;
Miller 2023's softmax-off-by-one at s_h = 0; robust_attn.mitigations.sinks)::

    out'_i = sum_j exp(s_ij) v_j / (exp(s_h) + sum_j exp(s_ij))  =  w_i out_i,
    w_i    = Z_i / (Z_i + exp(s_h))  =  sigmoid(lse_i - s_h)

with out_i and lse_i = log Z_i = log sum_j exp(s_ij) the plain attention's output and row
log-sum-exp, which ``torch.ops.aten._scaled_dot_product_flash_attention_for_cpu`` returns
together. So the sink costs one rescale of the finished rows instead of an extra key channel
(pads and concatenations of q, k and v).

Backward: the rows with the sink are the softmax over the extended key set, P'_ij =
exp(s_ij - lse'_i) with lse'_i = logaddexp(lse_i, s_h), restricted to the tokens' keys, and
out' = P' V. The softmax backward (e.g. Dao et al. 2022, FlashAttention, Algorithm 4) is

    dS_ij = P'_ij (g_i . v_j - D_i),   D_i = g_i . out'_i,    g = dL/dout'

which is exactly what the flash backward computes when given g, the output out' and the log-sum-
exp lse' (it recomputes P' from lse' and takes D from the output it is given), so dq, dk, dv come
from ``_scaled_dot_product_flash_attention_for_cpu_backward`` unchanged. The sink's own column
has dS_i,sink = p'_i,sink (g_i . 0 - D_i), p'_i,sink = exp(s_h - lse'_i) = 1 - w_i, so

    dL/ds_h = -sum_{b, i} (1 - w_i) g_i . out'_i            (the rows of head h)

(the gradient sinks.py's docstring gives). Tested against the extra-key formulation and a float64
eager reference (tests/test_sinks.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..problem import AttentionProblem
from .base import Kernel

_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
SUPPORTED_DTYPES = (torch.float32, torch.float64)


class _SinkAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, sink: Tensor, scale: float,
                causal: bool) -> Tensor:
        out, lse = _FORWARD(q, k, v, 0.0, causal, scale=scale)
        sink = sink.detach().to(lse.dtype).view(1, -1, 1)
        out.mul_(torch.sigmoid(lse - sink).unsqueeze(-1).to(out.dtype))  # a fresh tensor: in place
        ctx.save_for_backward(q, k, v, out, torch.logaddexp(lse, sink), sink)
        ctx.scale, ctx.causal = scale, causal
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        q, k, v, out, lse, sink = ctx.saved_tensors
        if grad.stride(-1) != 1:  # the flash backward takes any layout with unit channel stride
            grad = grad.contiguous()
        dq, dk, dv = _BACKWARD(grad, q, k, v, out, lse, 0.0, ctx.causal, scale=ctx.scale)
        dsink = None
        if ctx.needs_input_grad[3]:  # -sum_{b,i} p'_i,sink g_i . out'_i per head
            rows = torch.linalg.vecdot(grad, out, dim=-1).to(lse.dtype)
            dsink = -(torch.exp(sink - lse) * rows).sum(dim=(0, 2))
        return dq, dk, dv, dsink, None, None


def sink_attention(q: Tensor, k: Tensor, v: Tensor, sink: Tensor, scale: float,
                   causal: bool = False) -> Tensor:
    """Softmax attention of q, k, v (B, H, N, D) with the per-head sink logits ``sink`` (H,) as
    one more key of zero value (module docstring); ``causal``: top-left aligned, as SDPA's
    ``is_causal`` (Nq == Nk here). CPU, float32 or float64, no mask and no dropout."""
    return _SinkAttention.apply(q, k, v, sink, scale, causal)


def _unsupported(problem: AttentionProblem, dropout_p: float) -> str | None:
    q = problem.q
    if problem.sink_logits is None:
        return "no sink logits (sink_logit) to run"
    if q.device.type != "cpu" or q.dtype not in SUPPORTED_DTYPES:
        return "the CPU's flash op with its log-sum-exp, float32 or float64 only"
    if dropout_p > 0.0:
        return "dropout is not supported (the sink runs as a key on the other kernels)"
    if not problem.is_softmax or problem.score_mods:
        return "softmax without score modifiers only (softcap must see the sink's score)"
    if (problem.attn_mask is not None or problem.pattern is not None
            or problem.selection is not None or problem.prepended_keys):
        return "no mask, pattern, block selection or other prepended key"
    if problem.num_queries != problem.num_keys:
        return "Nq == Nk only (SDPA's causal mask is top-left aligned)"
    return None


SDPA_SINK = Kernel(
    "sdpa_sink",
    lambda problem, dropout_p: sink_attention(problem.q, problem.k, problem.v,
                                              problem.sink_logits, problem.scale, problem.causal),
    _unsupported, runs_sink_logits=True,
    no_lse="the sink rescales the CPU flash op's rows; their log-sum-exp with the sink is not "
           "returned")
"""Softmax attention with sink logits on the CPU's flash SDPA (module docstring)."""


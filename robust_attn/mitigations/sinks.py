"""Attention sinks: extra keys that every query may attend to, so a head can attend to nothing.

Softmax rows sum to one, so a head with nothing useful to read must still put its
mass somewhere; trained models pick a token (usually the first) as a sink. These
mitigations give them an explicit one, prepended before the tokens' keys. Two
options, which may be combined:

``sink_tokens=k`` (:class:`SinkTokens`): k learned key/value vectors per head,
the trainable sink token of Xiao et al. (2024), "Efficient Streaming Language
Models with Attention Sinks" (ICLR 2024), placed directly in each head's key and
value space::

    p_i   = softmax([scale q_i . k_sink_1, .., scale q_i . k_sink_k, s_i1, .., s_iN])
    out_i = sum_c p_ic v_sink_c + sum_j p_i(k+j) v_j

with s_ij the token scores after score modifiers and masks (-inf where blocked).

``sink_logit`` (:class:`SinkLogit`): a per-head logit s_h with a zero value, as in
gpt-oss (OpenAI 2025, ``gpt_oss/torch/model.py``: ``softmax(cat([QK, S]))`` with
the sink column dropped before multiplying by V)::

    out_i = sum_j exp(s_ij) v_j / (exp(s_h) + sum_j exp(s_ij))       (h: the head)

computed without materialising the attention matrix: a zero key (score 0), a
zero value and an additive mask column holding s_h, so SDPA and FlexAttention
run it as ordinary masked attention. Values:

    True          learned s_h, initialised at 0: a fresh module starts as
                  softmax-off-by-one and learns from there. (gpt-oss's reference
                  code leaves ``sinks`` uninitialised and loads it from the
                  checkpoint; Hugging Face's GptOss initialises it N(0, 0.02).)
    "off_by_one"  s_h fixed at 0, no parameter: Miller (2023), "Attention Is Off
                  By One", softmax_1(x)_i = exp(x_i) / (1 + sum_j exp(x_j)).
    "preserve"    learned s_h initialised at PRESERVING_SINK_LOGIT = -40, for
                  converting pretrained weights: e^-40 ~ 4e-18 is below float32
                  resolution relative to any row whose log-sum-exp exceeds -23, so
                  the output is unchanged within float32. Its gradient is as small,
                  so it starts learning only where a row's scores fall near it; for
                  a sink that learns at once, set ``logit`` to a value nearer the
                  scores (e.g. -8) after conversion.

Masks and causality: the prepended keys are visible to every query, whatever the
user's mask (its rows get allowed columns in front; a float mask keeps its
values) and under causal attention (the problem aligns causality lower-right).
So a query whose own keys are all blocked attends only to the sinks: it outputs
their values (sink tokens) or zero (sink logit). Score modifiers see each sink as
a key at the front (kv_idx 0 .. k-1) with the score above (0 for the sink logit's
zero key, where softcap leaves it unchanged). With several extra keys, the
latest prepended is key 0, the one the probe's ``sink_mass`` measures: for
``sink_logit`` alone, sink_mass is exactly the mass on the sink.

Mask cost of the sink logit: without a user mask the column is a (1, H, 1, Nk)
float mask; with one, the mask gains a head dimension, (B', H, Nq', Nk) for a
user mask of shape (B', 1 or H, Nq', Nk - 1), since the column differs per head.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AttentionConfig
from ..problem import AttentionProblem
from .base import Mitigation

PRESERVING_SINK_LOGIT = -40.0
SINK_TOKEN_INIT_STD = 0.02
SIGMOID_CONFLICT = ("an attention sink absorbs softmax mass; sigmoid attention weights need "
                    "not sum to one, so there is no mass to absorb")


def prepend_keys(problem: AttentionProblem, keys: Tensor, values: Tensor,
                 mask: Tensor | None) -> AttentionProblem:
    """The problem with keys (H, c, D) and values (H, c, Dv) in front of its own, and ``mask``."""
    batch = problem.k.shape[0]

    def in_front(extra: Tensor, tokens: Tensor) -> Tensor:
        extra = extra.to(tokens.dtype).expand(batch, -1, -1, -1)
        return torch.cat([extra, tokens], dim=-2)

    return problem.with_(k=in_front(keys, problem.k), v=in_front(values, problem.v),
                         attn_mask=mask)


def allowed_in_front(mask: Tensor | None, count: int) -> Tensor | None:
    """The user's mask with ``count`` allowed key columns in front (None stays None)."""
    if mask is None:
        return None
    return F.pad(mask, (count, 0), value=True if mask.dtype == torch.bool else 0.0)


def bias_column_in_front(mask: Tensor | None, bias: Tensor, num_keys: int,
                         dtype: torch.dtype) -> Tensor:
    """An additive mask: ``bias`` (1, H, 1, 1) in a front column, then the user's mask (or 0).

    A float user mask keeps its dtype; otherwise the mask is made in ``dtype``.
    """
    if mask is None:
        return F.pad(bias.to(dtype), (0, num_keys))
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            ~mask, -math.inf)
    mask = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    leading = torch.broadcast_shapes(mask.shape[:-1], bias.shape[:-1])
    return torch.cat([bias.to(mask.dtype).expand(*leading, 1), mask.expand(*leading, num_keys)],
                     dim=-1)


class SinkTokens(Mitigation):
    """``sink_tokens=k``: k learned key/value vectors per head, visible to every query.

    Parameters ``key`` (H, k, D) and ``value`` (H, k, Dv), initialised
    N(0, 0.02^2): near zero, so each starts close to a sink logit of 0 with a
    near-zero value, and random, so several tokens do not stay identical.
    Health: the mean norm of the sink keys and values per head (a sink whose
    value norm falls towards 0 acts as a no-op, as trained sinks do).
    """

    option = "sink_tokens"
    conflicts = {"sigmoid": SIGMOID_CONFLICT}

    def __init__(self, count: int, config: AttentionConfig):
        super().__init__()
        shape = (config.num_heads, count, config.head_dim)
        self.key = nn.Parameter(torch.empty(shape, **config.factory_kwargs))
        self.value = nn.Parameter(torch.empty(shape, **config.factory_kwargs))
        for parameter in (self.key, self.value):
            nn.init.normal_(parameter, std=SINK_TOKEN_INIT_STD)

    @classmethod
    def from_option(cls, value: Any, config: AttentionConfig) -> SinkTokens | None:
        if value is None or value is False or value == 0:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"sink_tokens={value!r}: expected a number of sink tokens such as 1 "
                             f"(0 or None: off)")
        return cls(value, config)

    @property
    def count(self) -> int:
        return self.key.shape[1]

    def extend_keys(self, problem: AttentionProblem) -> AttentionProblem:
        return prepend_keys(problem, self.key, self.value,
                            allowed_in_front(problem.attn_mask, self.count))

    def health(self) -> dict[str, Tensor]:
        return {"key_norm": self.key.float().norm(dim=-1).mean(dim=-1),
                "value_norm": self.value.float().norm(dim=-1).mean(dim=-1)}

    def extra_repr(self) -> str:
        return f"count={self.count}"


class SinkLogit(Mitigation):
    """``sink_logit=True | "off_by_one" | "preserve"``: a per-head sink logit s_h with a zero value.

    ``logit`` (H,) is a parameter (True, "preserve") or a fixed zero buffer,
    absent from the state dict ("off_by_one"). Health: ``logit``, per head; the
    probe's ``sink_mass`` is the mass on the sink when no other key is prepended
    after it.
    """

    option = "sink_logit"
    conflicts = {"sigmoid": SIGMOID_CONFLICT}
    INITIAL_LOGITS = {True: 0.0, "preserve": PRESERVING_SINK_LOGIT}

    def __init__(self, initial: float, learned: bool, config: AttentionConfig):
        super().__init__()
        logit = torch.full((config.num_heads,), initial, **config.factory_kwargs)
        if learned:
            self.logit = nn.Parameter(logit)
        else:
            self.register_buffer("logit", logit, persistent=False)

    @classmethod
    def from_option(cls, value: Any, config: AttentionConfig) -> SinkLogit | None:
        if value is None or value is False:
            return None
        if value == "off_by_one":
            return cls(0.0, learned=False, config=config)
        if isinstance(value, (bool, str)) and value in cls.INITIAL_LOGITS:
            return cls(cls.INITIAL_LOGITS[value], learned=True, config=config)
        raise ValueError(f"sink_logit={value!r}: expected True (learned, starts at 0), "
                         f"'off_by_one' (fixed at 0), 'preserve' (learned, starts at "
                         f"{PRESERVING_SINK_LOGIT}) or None")

    @property
    def learned(self) -> bool:
        return isinstance(self.logit, nn.Parameter)

    def extend_keys(self, problem: AttentionProblem) -> AttentionProblem:
        heads = problem.k.shape[1]
        zero_key = problem.k.new_zeros(heads, 1, problem.k.shape[-1])
        zero_value = problem.v.new_zeros(heads, 1, problem.v.shape[-1])
        mask = bias_column_in_front(problem.attn_mask, self.logit.view(1, heads, 1, 1),
                                    problem.num_keys, problem.q.dtype)
        return prepend_keys(problem, zero_key, zero_value, mask)

    def health(self) -> dict[str, Tensor]:
        return {"logit": self.logit.float()}

    def extra_repr(self) -> str:
        return "learned" if self.learned else "off_by_one (fixed at 0)"

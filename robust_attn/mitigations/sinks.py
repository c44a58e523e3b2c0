"""Attention sinks: extra keys that every query may attend to, so a head can attend to nothing.

Softmax rows sum to one, so a head with nothing useful to read must still put its
mass somewhere; trained models pick a token (usually the first) as a sink. These
mitigations give them an explicit one, prepended before the tokens' keys. Two
options, which may be combined:

``sink_tokens=k`` (:class:`SinkTokens`): k learned key/value slots per head and
per layer, placed directly in each head's key and value space. They are not
StreamingLLM's attention sink (Xiao et al. 2024, "Efficient Streaming Language
Models with Attention Sinks", ICLR 2024), which keeps the first input tokens'
keys and values in the cache, nor its learnable sink token, which is one token
prepended to the input sequence and passed through every layer: our slots are
parameters of each attention layer (a learned key and value where the sink logit
below has a learned score and a zero value)::

    p_i   = softmax([scale q_i . k_sink_1, .., scale q_i . k_sink_k, s_i1, .., s_iN])
    out_i = sum_c p_ic v_sink_c + sum_j p_i(k+j) v_j

with s_ij the token scores after score modifiers and masks (-inf where blocked).

``sink_logit`` (:class:`SinkLogit`): a per-head logit s_h with a zero value, as in
gpt-oss (OpenAI 2025, ``gpt_oss/torch/model.py``: ``softmax(cat([QK, S]))`` with
the sink column dropped before multiplying by V)::

    out_i = sum_j exp(s_ij) v_j / (exp(s_h) + sum_j exp(s_ij))       (h: the head)

computed without materialising the attention matrix, as one more key whose
score is s_h: q and k gain a channel (1 for every query, 0 for every key) and
the sink key is zero except in that channel, where it holds s_h / scale, so

    scale * [q_i, 1] . [0, s_h / scale] = s_h,    scale * [q_i, 1] . [k_j, 0] = scale q_i . k_j

with a zero value. It is an ordinary key to every kernel: no mask is needed
(SDPA keeps its fused kernel), and each kernel's own backward pass gives the
gradient of s_h exactly, -sum_i p_i,sink <dL/dout_i, out_i> (the softmax
derivative with a zero value). The logits travel in the problem
(``problem.sink_logits``): where the CPU's fused SDPA would solve it (no mask,
pattern, score modifier or dropout), the sdpa_sink kernel leaves the key and its
channel out and rescales SDPA's finished rows instead, out_i * sigmoid(lse_i - s_h)
(:mod:`robust_attn.kernels.sdpa_sink`: the same output and gradients without
copying q, k and v; benchmarks/dense_overhead.py); every other kernel, and every
reader of the solved problem (the probe's sink mass, observers), gets the key
(:meth:`robust_attn.problem.AttentionProblem.with_sink_as_key`).
Values:

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
                  scores (e.g. -8) after conversion. Under softcap the sink's score
                  is cap * tanh(-40 / cap) (-33 for cap = 50): still below float32
                  resolution relative to any row whose log-sum-exp exceeds -16.

Masks and causality: the prepended keys are visible to every query, whatever the
user's mask (its rows get allowed columns in front; a float mask keeps its
values) and under causal attention (the problem aligns causality lower-right).
So a query whose own keys are all blocked attends only to the sinks: it outputs
their values (sink tokens) or zero (sink logit). Score modifiers see each sink as
a key at the front (kv_idx 0 .. k-1) with the score above: s_h for the sink
logit, so softcap bounds it like every other logit, cap * tanh(s_h / cap). With
several extra keys, the latest prepended is key 0, the one the probe's
``sink_mass`` measures: for ``sink_logit`` alone, sink_mass is exactly the mass
on the sink. A user mask only gains allowed columns in front (None stays None).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..claim import ENTROPY, RANK, Claim, witnesses_at
from ..config import AttentionConfig
from ..problem import AttentionProblem, allowed_in_front, prepend_keys
from .base import HostLayers, Mitigation

if TYPE_CHECKING:
    from ..call import AttentionCall

PRESERVING_SINK_LOGIT = -40.0
SINK_TOKEN_INIT_STD = 0.02
SIGMOID_CONFLICT = ("an attention sink absorbs softmax mass; sigmoid attention weights need "
                    "not sum to one, so there is no mass to absorb")


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
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Draw the sink keys and values afresh, N(0, SINK_TOKEN_INIT_STD^2)."""
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

    def extend_keys(self, problem: AttentionProblem, call: AttentionCall) -> AttentionProblem:
        return prepend_keys(problem, self.key, self.value,
                            allowed_in_front(problem.attn_mask, self.count, problem.num_keys))

    def prepended_keys(self) -> int:
        return self.count

    def health(self, layers: HostLayers, call: AttentionCall | None = None) -> dict[str, Tensor]:
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
    # Early warnings: code -> (rank among the presets suggested for it, 1 first; why it helps).
    advice_preset = 'sink'
    advice = {
        'attention_sink': (2, 'a learned sink logit gives heads an explicit one'),
    }
    claims = (
        Claim(
            "sink", "Miller 2023; OpenAI 2025 (gpt-oss); Xiao et al. 2024 (StreamingLLM, for the "
                    "sink phenomenon)",
            "a sink gives attention somewhere to put unneeded mass; no claim about collapse at "
            "initialisation",
            note="Measured: as the baseline. A sink logit of 0 takes a share 1 / (N + 1) of "
                 "near-uniform rows and nothing from rows with large logits.",
            witnesses=witnesses_at("sink", RANK, ENTROPY),
        ),
    )
    # gpt-oss's learned per-head sink logit (zero value: it can only take mass away), starting
    # at 0 = softmax-off-by-one; H parameters. sink_tokens=k adds k learned key/value slots per
    # layer instead (not StreamingLLM's prepended input token).
    presets = {"sink": {"sink_logit": True}}
    conflicts = {"sigmoid": SIGMOID_CONFLICT}
    preserving_values = {True: "preserve"}
    INITIAL_LOGITS = {True: 0.0, "preserve": PRESERVING_SINK_LOGIT}

    def __init__(self, initial: float, learned: bool, config: AttentionConfig):
        super().__init__()
        logit = torch.full((config.num_heads,), initial, **config.factory_kwargs)
        self.initial = initial
        if learned:
            self.logit = nn.Parameter(logit)
        else:
            self.register_buffer("logit", logit, persistent=False)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The logit back at its initial value (after ``to_empty`` on the meta device)."""
        self.logit.fill_(self.initial)

    @torch.no_grad()
    def reset_from_weights(self, layers: HostLayers) -> None:
        """A fixed logit ("off_by_one") is a non-persistent buffer, which no state dict restores:
        set it to 0 again (it holds garbage after ``to_empty``). A learned one is loaded."""
        if not self.learned:
            self.logit.fill_(self.initial)

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

    def saved_value(self) -> str:
        return "learned" if self.learned else "off_by_one"

    def extend_keys(self, problem: AttentionProblem, call: AttentionCall) -> AttentionProblem:
        """The sink logits join the problem (``problem.sink_logits``): the sdpa_sink kernel
        rescales SDPA's rows by them; every other kernel, and every reader of the solved problem,
        gets them as one more key (:meth:`AttentionProblem.with_sink_as_key`: module docstring)."""
        return problem.with_(sink_logits=self.logit)

    def prepended_keys(self) -> int:
        return 1

    def keeps_function(self, source: nn.Module) -> bool:
        """A learned logit at or below PRESERVING_SINK_LOGIT adds nothing within float32."""
        return self.learned and bool((self.logit <= PRESERVING_SINK_LOGIT).all())

    def health(self, layers: HostLayers, call: AttentionCall | None = None) -> dict[str, Tensor]:
        return {"logit": self.logit.float()}

    def extra_repr(self) -> str:
        return "learned" if self.learned else "off_by_one (fixed at 0)"

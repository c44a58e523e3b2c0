"""One forward of a RobustAttention, as values: what it was given, and what it computed.

Per-call data travels in these records, never on modules (x-transformers'
``attend.py`` returns its intermediates the same way, as a dataclass):

* :class:`AttentionCall`, built once per forward and handed to every stage
  (``transform_qk``, ``extend_keys``, ``attend``, ``transform_output``, ``health``):
  the module input x, the mask as kernels take it, causality, the RoPE embedding
  when the caller passes one, and the module's kernel choice, through which a stage
  solves a problem of its own (:meth:`AttentionCall.attend`: outlier removal's
  uniform attention, differential attention's two maps).
* :class:`Attended`, the kernel's answer to the call's problem: the problem, the
  output, each row's log-sum-exp when a stage or an observer asked for it, and the
  kernel that ran.
* :class:`AttentionRecord`, given to observers
  (:meth:`robust_attn.RobustAttention.register_observer`) after the forward: the
  call, the answer after the output transforms, the module output, and the health
  (:class:`~robust_attn.health.probe.AttentionHealth`) and sampled attention map when
  the observer asked for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from torch import Tensor

from .kernels import solve
from .problem import AttentionProblem

if TYPE_CHECKING:
    from .health.probe import AttentionHealth, AttentionMap


@dataclass(frozen=True)
class Attended:
    """A solved problem: ``given`` (the problem as the stages built it), ``out`` (B, H, Nq, Dv),
    ``lse`` (B, H, Nq) float32 or None (not asked for), and the name of the kernel that computed
    them (kernels/base.py: the contract)."""

    given: AttentionProblem
    out: Tensor
    lse: Tensor | None
    kernel: str

    @property
    def problem(self) -> AttentionProblem:
        """The solved problem as its readers take it (the probe, observers, output stages): sink
        logits as the key they stand for (:meth:`AttentionProblem.with_sink_as_key`), built when
        read (``given`` itself without sink logits), so a forward nobody inspects never copies
        q, k and v for it. Not cached: functools.cached_property takes a lock that
        torch.compile cannot trace (Python 3.11)."""
        return self.given.with_sink_as_key()

    def with_out(self, out: Tensor) -> Attended:
        return replace(self, out=out)


@dataclass(frozen=True)
class AttentionCall:
    """What one forward was given.

    x: the module input (B, N, C); None only for a stage run on its own (a test calling
        ``extend_keys(problem, AttentionCall(None))``), outside a module's forward.
    attn_mask: the caller's mask as every kernel takes it (4-D, a float mask in q's dtype), or None.
    is_causal: lower-right aligned causal attention.
    rope: the RoPE embedding ``cat([sin, cos], -1)`` for this call (RobustAttentionRope), or None.
    kernel: the module's kernel choice ('auto', 'sdpa', ..., 'eager').
    dropout_p: the attention dropout of this call (0 in eval mode).
    """

    x: Tensor | None
    attn_mask: Tensor | None = None
    is_causal: bool = False
    rope: Tensor | None = None
    kernel: str = "auto"
    dropout_p: float = 0.0

    def attend(self, problem: AttentionProblem, dropout_p: float | None = None,
               lse: bool = False) -> Attended:
        """Solve ``problem`` on this call's kernel choice ('auto' picks per problem); dropout is
        the call's unless given (a stage's auxiliary problem passes 0)."""
        dropout = self.dropout_p if dropout_p is None else dropout_p
        kernel, solved = solve(self.kernel, problem, dropout, lse)
        return Attended(problem, solved.out, solved.lse, kernel)


@dataclass(frozen=True)
class AttentionRecord:
    """One forward, as an observer receives it.

    call: what the forward was given. attended: the solved problem, ``attended.out`` after
    every output transform (B, H, Nq, Dv): what the heads hand to the merge and the projection.
    output: the module output (B, N, C_out). health: the probe's measurement, when the observer
    asked for it (or the module's probe is on). attention_map: the sampled attention weights the
    probe computed, when the observer asked for maps.
    """

    call: AttentionCall
    attended: Attended
    output: Tensor
    health: AttentionHealth | None
    attention_map: AttentionMap | None


Observer = Callable[[object, AttentionRecord], None]


@dataclass(frozen=True)
class ObserverEntry:
    """A registered observer and what it asks each forward to compute for it."""

    fn: Observer
    health: bool = False
    maps: bool = False
    lse: bool = False

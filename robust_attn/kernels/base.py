"""What a kernel is: a function of an AttentionProblem, and the reason it cannot run one.

The contract. ``kernel.solve(problem, dropout_p, lse=False)`` returns a
:class:`KernelOutput`:

    out  (B, H, Nq, Dv)   sum_j normalizer(s)_ij v_j        (the problem's definition)
    lse  (B, H, Nq)       log sum_j exp(s_ij), float32, over the allowed keys (-inf for a
                          row with none), computed from the same scores, when asked for

The log-sum-exp is each softmax row's normaliser, the quantity flash attention
keeps (Dao et al. 2022, "FlashAttention", Algorithm 1's m + log l): a stage can
rescale a finished row with it (one more key of score s adds a factor
1 / (1 + exp(s - lse)) to the row) or bound the row's largest logit by it
(max_j s_ij <= lse_i <= max_j s_ij + log Nk). It is a constant for autograd: no
gradient flows back through it, on any kernel. Softmax problems only.

A kernel that cannot give it says so: :meth:`Kernel.unsupported` with ``lse=True``
names why (SDPA's public function returns no log-sum-exp; the structured sparse
kernels do not compute it), and ``auto`` then picks the next kernel that can.
Every kernel that gives it is tested equal to the eager reference's.

A per-call block selection (``problem.selection``: block_topk) is run by the kernels that say
so (``runs_selection``: the selected-blocks kernel); every other kernel sees it as the bool
mask it stands for (:meth:`AttentionProblem.with_selection_as_mask`), so no kernel can ignore
it. Sink logits (``problem.sink_logits``) likewise: the sdpa_sink kernel runs them
(``runs_sink_logits``), every other kernel sees them as one more key
(:meth:`AttentionProblem.with_sink_as_key`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from ..problem import AttentionProblem


@dataclass(frozen=True)
class KernelOutput:
    """A kernel's answer: the output (B, H, Nq, Dv) and, when asked for, each row's log-sum-exp
    (B, H, Nq) in float32 (None otherwise)."""

    out: Tensor
    lse: Tensor | None = None


Run = Callable[[AttentionProblem, float], Tensor]
RunWithLse = Callable[[AttentionProblem, float], tuple[Tensor, Tensor]]

LSE_NEEDS_SOFTMAX = "a log-sum-exp exists for softmax attention only"


@dataclass(frozen=True)
class Kernel:
    """An attention kernel.

    run(problem, dropout_p) -> (B, H, Nq, Dv).
    unsupported(problem, dropout_p) -> None when the kernel can compute the
        problem exactly on its device, else the reason it cannot (shown to users).
    run_with_lse(problem, dropout_p) -> (out, lse), where the kernel computes rows'
        log-sum-exp (None: it does not; ``no_lse`` says why).
    runs_selection: the kernel reads ``problem.selection`` itself; otherwise it gets the
        problem with its selection folded into the mask.
    runs_sink_logits: the kernel reads ``problem.sink_logits`` itself; otherwise it gets the
        problem with the sink as one more key.
    """

    name: str
    run: Run
    unsupported_problem: Callable[[AttentionProblem, float], str | None]
    run_with_lse: RunWithLse | None = None
    no_lse: str = "this kernel does not compute the rows' log-sum-exp"
    runs_selection: bool = False
    runs_sink_logits: bool = False

    def sees(self, problem: AttentionProblem) -> AttentionProblem:
        """The problem as this kernel gets it: its sink logits as a key unless the kernel runs
        them, then its block selection as a mask unless the kernel runs selections."""
        if problem.sink_logits is not None and not self.runs_sink_logits:
            problem = problem.with_sink_as_key()
        if problem.selection is not None and not self.runs_selection:
            problem = problem.with_selection_as_mask()
        return problem

    def unsupported(self, problem: AttentionProblem, dropout_p: float,
                    lse: bool = False) -> str | None:
        """Why this kernel cannot solve ``problem`` (with the log-sum-exp when ``lse``), or None."""
        if lse and self.run_with_lse is None:
            return self.no_lse
        if lse and not problem.is_softmax:
            return LSE_NEEDS_SOFTMAX
        return self.unsupported_problem(self.sees(problem), dropout_p)

    def solve(self, problem: AttentionProblem, dropout_p: float = 0.0,
              lse: bool = False) -> KernelOutput:
        """The output and, when ``lse``, each row's log-sum-exp (module docstring)."""
        problem = self.sees(problem)
        if problem.num_queries == 0:  # no query row: an empty output (kernels need a row)
            empty = problem.v[..., :0, :]
            return KernelOutput(empty, empty.new_zeros(empty.shape[:-1]).float() if lse else None)
        if not lse:
            return KernelOutput(self.run(problem, dropout_p))
        out, row_lse = self.run_with_lse(problem, dropout_p)
        return KernelOutput(out, row_lse.detach().float())

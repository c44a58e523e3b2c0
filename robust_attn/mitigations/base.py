"""The mitigation pipeline's extension points.

RobustAttention runs (the README's pipeline):

    x -> projections -> split heads -> q/k transforms -> key/value extras
      -> scores (score_mod, normalizer) -> kernel -> output transforms -> merge heads -> proj
    side outputs: auxiliary losses, health

A mitigation is an ``nn.Module`` that owns its parameters and overrides only
the stages it plugs into; every stage defaults to doing nothing. It is turned
on by one keyword option of RobustAttention (its ``option``) and built by
``from_option(value, config)``, which returns None when the value turns it off.
``conflicts`` names the options it cannot be combined with, and why; the
module refuses such combinations at construction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from ..config import AttentionConfig
from ..problem import AttentionProblem, ScoreMod


class DefeatedMitigationWarning(UserWarning):
    """A mitigation was combined with an option that defeats it (the message says why)."""


class Mitigation(nn.Module):
    option: ClassVar[str]
    conflicts: ClassVar[Mapping[str, str]] = {}
    # Order of transform_output among mitigations, lowest first (ties keep option order), so
    # the result does not depend on the order of the options: corrections that complete the
    # attention output (outlier removal) keep 0; transforms of the finished output (gates) use 1.
    output_order: ClassVar[int] = 0
    # How robust_attn.health.distributed.reduce_health combines each health() quantity across ranks:
    # "mean" unless named here ("min" or "max", e.g. a bound that holds for the worst sequence).
    health_reductions: ClassVar[Mapping[str, str]] = {}

    @classmethod
    def from_option(cls, value: Any, config: AttentionConfig) -> Mitigation | None:
        """Build from the option's value (None or False: off). Override for options with arguments."""
        if value is None or value is False:
            return None
        if value is not True:
            raise ValueError(f"{cls.option}={value!r}: expected True, False or None")
        return cls(config)

    # Stage: projections. A Linear replacement for qkv and proj (e.g. sigma-reparametrised).
    def make_linear(self, in_features: int, out_features: int, bias: bool,
                    config: AttentionConfig) -> nn.Module | None:
        return None

    # Stage: q/k transforms, on heads (B, H, N, D), after timm's q_norm / k_norm.
    def transform_qk(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return q, k

    # Stage: key/value extras (sink tokens, registers, a zero key), and their mask columns.
    def extend_keys(self, problem: AttentionProblem) -> AttentionProblem:
        return problem

    # Stage: scores. A FlexAttention-style score_mod applied to scale * q k^T, or None.
    def score_mod(self) -> ScoreMod | None:
        return None

    # Stage: scores. Replaces softmax (e.g. sigmoid attention); at most one mitigation may.
    def normalizer(self) -> Callable[[Tensor], Tensor] | None:
        return None

    # Stage: output transforms, on the kernel's output (B, H, N, Dv); x is the module input.
    def transform_output(self, out: Tensor, problem: AttentionProblem, x: Tensor) -> Tensor:
        return out

    # After the host's weights were freshly drawn by a custom init: apply the mitigation's own
    # initialisation of them (e.g. spectral_qk's concentrated QK spectrum). Not after a load.
    def initialise_weights(self) -> None:
        return None

    # After the host's weights were replaced in place (an init, a loaded timm state dict):
    # recompute whatever the mitigation derives from them (e.g. sigma_reparam's u, v, gamma).
    def reset_from_weights(self) -> None:
        return None

    # Side output: a loss the user adds to the task loss, or None.
    def auxiliary_loss(self) -> Tensor | None:
        return None

    # Side output: the mitigation's own health quantities, read by the probe (no grad).
    def health(self) -> dict[str, Tensor]:
        return {}

    # Checkpoints: what the option's value changes in the function computed, beyond the state
    # dict's tensors (a str, number, bool or tuple of them; RobustAttention stores it in the state
    # dict's metadata and refuses a load into a module whose value differs). Choices that only
    # set the initial state (sigma_reparam="preserve") or the training loss are left out: True.
    def saved_value(self) -> Any:
        return True

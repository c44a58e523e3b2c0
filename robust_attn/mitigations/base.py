"""The mitigation pipeline's extension points (docs/architecture.md).

RobustAttention runs (the README's pipeline):

    x -> projections -> split heads -> q_norm/k_norm -> q/k transforms -> key/value extras
      -> scores (score_mod, normalizer) -> attend (a kernel) -> output transforms
      -> merge heads -> norm -> proj
    side outputs: auxiliary losses, health

A mitigation is an ``nn.Module`` that owns its parameters and overrides only
the stages it plugs into; every stage defaults to doing nothing. It is turned
on by one keyword option of RobustAttention (its ``option``) and built by
``from_option(value, config)``, which returns None when the value turns it off.
``conflicts`` names the options it cannot be combined with, and why; the
module refuses such combinations at construction.

Per-call data reaches the stages in the :class:`~robust_attn.call.AttentionCall`
(the module input, the mask, the RoPE embedding, the kernel choice); a stage
never stores it on a module. Layers are built by role (:class:`LayerSpec`:
"qkv", "proj", "q_norm", "k_norm"); the stages that read or change weights get the
host's layers by role (:data:`HostLayers`) at each call, so a mitigation keeps no
reference to a layer it did not build (QK-clip and spectral_qk act on whatever qkv
the host holds: the default one, or a converted model's).

Facts about a mitigation live on its class, and the rest of the library reads
them instead of special-casing it: the option values that keep a converted
model's function (``preserving_values``) and whether a built one does
(:meth:`Mitigation.keeps_function`), whether timm's Attention can hold it on
revert (:meth:`Mitigation.timm_expressible`), how many keys it prepends
(:meth:`Mitigation.prepended_keys`), the presets it defines (``presets``), the
advice early warnings give for it (``advice``) and its claims (``claims``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor, nn

from ..config import AttentionConfig
from ..problem import AttentionProblem, ScoreMod

if TYPE_CHECKING:
    from ..call import Attended, AttentionCall
    from ..claim import Claim


@dataclass(frozen=True)
class LayerSpec:
    """A layer RobustAttention builds: its role ("qkv", "proj": linear layers; "q_norm",
    "k_norm": per-head normalisations, nn.Identity unless a mitigation builds them), widths and
    bias."""

    role: str
    in_features: int
    out_features: int
    bias: bool = False


HostLayers = Mapping[str, nn.Module]
"""The host's layers by role ("qkv", "q_norm", "k_norm", "proj"), as it holds them now
(RobustAttention.layers_by_role); empty where the host has none of its own (the Hugging Face
container, whose projections are the model's)."""


class DefeatedMitigationWarning(UserWarning):
    """A mitigation was combined with an option that defeats it (the message says why)."""


class Mitigation(nn.Module):
    option: ClassVar[str]
    conflicts: ClassVar[Mapping[str, str]] = {}
    # Order of transform_output among mitigations, lowest first (ties keep option order), so
    # the result does not depend on the order of the options: corrections that complete the
    # attention output (outlier removal) keep 0; transforms of the finished output (gates) use 1.
    output_order: ClassVar[int] = 0
    # Order of score_mod among mitigations, lowest first (ties keep option order), for the same
    # reason: transforms of the content logit (softcap) keep 0; biases added to the finished
    # logits (ALiBi's distance penalty) use 1.
    score_order: ClassVar[int] = 0
    # How robust_attn.health.distributed.reduce_health combines each health() quantity across
    # ranks: "mean" unless named here ("min" or "max", e.g. a bound that holds for the worst
    # sequence).
    health_reductions: ClassVar[Mapping[str, str]] = {}
    # The kernel must return each row's log-sum-exp for this mitigation's stages (Attended.lse).
    needs_lse: ClassVar[bool] = False
    # Fact: the head width D must be a multiple of this (differential attention halves each head);
    # RobustAttention refuses other widths, naming the option.
    head_dim_multiple: ClassVar[int] = 1

    # Facts (module docstring). Option values that convert replaces by function-preserving ones.
    preserving_values: ClassVar[Mapping[Any, Any]] = {}
    # Presets this mitigation defines: name -> RobustAttention options.
    presets: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    # Early-warning code -> why this mitigation's preset (``advice_preset``) helps.
    advice: ClassVar[Mapping[str, str]] = {}
    advice_preset: ClassVar[str | None] = None
    # The claims of the presets it defines (robust_attn.claim.Claim), measured by studies/.
    claims: ClassVar[tuple[Claim, ...]] = ()

    @classmethod
    def from_option(cls, value: Any, config: AttentionConfig) -> Mitigation | None:
        """Build from the option's value (None or False: off). Override for options with arguments."""
        if value is None or value is False:
            return None
        if value is not True:
            raise ValueError(f"{cls.option}={value!r}: expected True, False or None")
        return cls(config)

    # Stage: layers. A replacement for the layer ``spec.role`` (e.g. sigma-reparametrised qkv and
    # proj, qk_norm's q_norm and k_norm), or None for the default.
    def make_layer(self, spec: LayerSpec, config: AttentionConfig) -> nn.Module | None:
        return None

    # Stage: q/k transforms, on heads (B, H, N, D), after q_norm / k_norm.
    def transform_qk(self, q: Tensor, k: Tensor, call: AttentionCall) -> tuple[Tensor, Tensor]:
        return q, k

    # Stage: key/value extras (sink tokens, registers, a zero key), and their mask columns.
    def extend_keys(self, problem: AttentionProblem, call: AttentionCall) -> AttentionProblem:
        return problem

    # Stage: scores. A FlexAttention-style score_mod applied to scale * q k^T, or None. Mark it
    # ``positional = True`` to see token positions (robust_attn.problem).
    def score_mod(self) -> ScoreMod | None:
        return None

    # Stage: scores. Replaces softmax (e.g. sigmoid attention); at most one mitigation may.
    def normalizer(self) -> Callable[[Tensor], Tensor] | None:
        return None

    # Stage: attend. Solves the problem in its own way (differential attention's two maps), with
    # call.attend for each kernel call; None: the kernel solves it. At most one mitigation may.
    def attend(self, problem: AttentionProblem, call: AttentionCall) -> Attended | None:
        return None

    # Stage: output transforms, on the solved problem (its out: B, H, N, Dv); returns the new out.
    def transform_output(self, attended: Attended, call: AttentionCall) -> Tensor:
        return attended.out

    # The stages below that read or change weights get the host's layers by role
    # (``HostLayers``: qkv, q_norm, k_norm, proj) at each call: a mitigation never keeps a
    # reference to a layer it did not build, so it acts on whatever layer the host holds now.

    # After the host's weights were freshly drawn (at construction, and by a custom init):
    # apply the mitigation's own initialisation of them (e.g. spectral_qk's concentrated QK
    # spectrum). Not after a load.
    def initialise_weights(self, layers: HostLayers) -> None:
        return None

    # After the host's weights were replaced in place (an init, a loaded timm state dict):
    # recompute whatever the mitigation derives from them (e.g. sigma_reparam's u, v, gamma).
    def reset_from_weights(self, layers: HostLayers) -> None:
        return None

    # After an optimiser step (robust_attn.after_optimizer_step): act on the updated weights
    # (QK-clip's rescaling).
    def after_optimizer_step(self, layers: HostLayers) -> None:
        return None

    # Side output: a loss the user adds to the task loss, or None.
    def auxiliary_loss(self, layers: HostLayers) -> Tensor | None:
        return None

    # Side output: the mitigation's own health quantities, read by the probe (no grad), for the
    # call measured; with call=None (outside a forward) those of its weights alone.
    def health(self, layers: HostLayers, call: AttentionCall | None = None) -> dict[str, Tensor]:
        return {}

    # Checkpoints: what the option's value changes in the function computed, beyond the state
    # dict's tensors (a str, number, bool or tuple of them; RobustAttention stores it in the state
    # dict's metadata and refuses a load into a module whose value differs). Choices that only
    # set the initial state (sigma_reparam="preserve") or the training loss are left out: True.
    def saved_value(self) -> Any:
        return True

    # Fact: keys prepended in front of the tokens' own (sinks), visible to every query.
    def prepended_keys(self) -> int:
        return 0

    # Fact: whether this mitigation, as built, computes what ``source`` (the module it was
    # converted from) computed. Default: it changes the function.
    def keeps_function(self, source: nn.Module) -> bool:
        return False

    # Fact: whether timm's Attention can hold it on revert (folded into weights, a loss only, a
    # layer timm has). ``host`` is the RobustAttention that holds it.
    def timm_expressible(self, host: nn.Module) -> bool:
        return False

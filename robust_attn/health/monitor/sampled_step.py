"""One sampled step: observers gathering each module's health, then the readings.

While a SampledStep is open, each monitored module has an observer
(:meth:`RobustAttention.register_observer` with health and maps) that keeps the
call's :class:`~robust_attn.health.probe.AttentionHealth`, the module's input and
output statistics (res and cosine of the tokens entering it, the branch gain) and
compares the attention map the probe sampled with the map of the attention call
before it; only that one previous map is held (and, with ``keep_maps``, each
module's first batch item). ``collect`` turns those into one tensor per metric;
``close`` removes the observers, so steps that are not sampled run the plain
forward. The modules' probe switches and ``health`` attributes are never touched.
"""

from __future__ import annotations

from contextlib import ExitStack

import torch
from torch import Tensor

from ... import metrics
from ...attention import RobustAttention
from ..probe import AttentionHealth, AttentionMap
from .maps import map_similarity


def branch_statistics(x: Tensor, output: Tensor) -> dict[str, Tensor]:
    """Statistics of a module's input tokens x (B, N, C) and of its output against its input.

    input_residual = mean over the batch of res(x); input_cosine = mean token
    cosine similarity of x (metrics.token_residual, metrics.token_cosine_similarity);
    branch_gain = ||output||_F / ||x||_F, how much the attention branch weighs
    against what enters it. He et al. (2024), "What Matters in Transformers?
    Not All Attention is Needed" (arXiv:2406.15786), drop attention layers that
    change their input least; this gain is the cheap per-step analogue.
    """
    x, output = x.detach().float(), output.detach().float()
    return {
        "input_residual": metrics.token_residual(x).mean(),
        "input_cosine": metrics.token_cosine_similarity(x).mean(),
        "branch_gain": output.norm() / x.norm().clamp_min(torch.finfo(torch.float32).tiny),
    }


class SampledStep:
    """Probes and hooks on ``modules`` from construction until :meth:`close`."""

    def __init__(self, modules: dict[str, RobustAttention], keep_maps: bool = False):
        self.modules = modules
        self.keep_maps = keep_maps
        self.inputs: dict[str, dict[str, Tensor]] = {}
        self.health: dict[str, AttentionHealth] = {}
        self.maps: dict[str, Tensor] = {}
        self._previous_map: AttentionMap | None = None
        self._observers = ExitStack()
        for name, module in modules.items():
            handle = module.register_observer(self._observer(name), health=True, maps=True)
            self._observers.callback(handle.remove)

    def _observer(self, name: str):
        def observer(module, record) -> None:
            current = record.attention_map
            self.health[name] = record.health
            if self.keep_maps:
                self.maps[name] = current.weights[0]
            with torch.no_grad():
                self.inputs[name] = {**branch_statistics(record.call.x, record.output),
                                     "map_similarity": self._similarity(current)}

        return observer

    def _similarity(self, current: AttentionMap | None) -> Tensor:
        """Mean over heads of map_similarity with the previous call's map; keeps this one."""
        previous, self._previous_map = self._previous_map, current
        if previous is None or current is None:
            return torch.tensor(torch.nan)
        return map_similarity(previous, current).nanmean()

    def close(self) -> None:
        self._observers.close()

    def collect(self) -> dict[str, dict[str, Tensor]]:
        """Per module and metric: an (H,) or () tensor; nan where the module did not run."""
        return {name: {**_health_readings(self.health.get(name), module.num_heads),
                       **self.inputs.get(name, _no_inputs())}
                for name, module in self.modules.items()}


def _health_readings(health, heads: int) -> dict[str, Tensor]:
    if health is None:
        nan = torch.full((heads,), torch.nan)
        return {"entropy": nan, "min_entropy": nan, "sink_mass": nan, "max_logit": nan,
                "head_cosine": nan, "head_residual": nan, "nonfinite": torch.tensor(torch.nan)}
    return {"entropy": health.entropy, "min_entropy": health.min_entropy,
            "sink_mass": health.sink_mass, "max_logit": health.max_logit,
            "head_cosine": health.cosine, "head_residual": health.residual,
            "nonfinite": sum(health.nonfinite.values()).float()}


def _no_inputs() -> dict[str, Tensor]:
    return {key: torch.tensor(torch.nan) for key in ("input_residual", "input_cosine",
                                                     "branch_gain", "map_similarity")}

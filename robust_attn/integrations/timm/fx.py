"""RobustAttention as a leaf module of timm's torch.fx tracing.

torch.fx cannot trace inside RobustAttention: its forward dispatches on the observers, the
probe switch and the kernel for x's device, dtype and mask, which a static graph would freeze,
and it refuses a Proxy input with a TypeError saying so (``RobustAttention._check_input``).
As a leaf, each attention module is one ``call_module`` node that runs the real forward.

timm's tracing (``features_only=True, feature_cls="fx"``, ``timm.models.create_feature_extractor``,
``get_graph_node_names``) passes its registry of no-trace modules to torchvision's tracer,
which tests ``isinstance`` against it, so registering RobustAttention covers every subclass
(RobustAttentionRope, the classes :func:`robust_attn.layer` makes). :func:`robust_attn.convert`
and :func:`robust_attn.layer` register it: they are how RobustAttention enters a timm model, and
timm is imported only there (an optional dependency). Other tracers take it as a leaf module
explicitly, e.g. torchvision's ``create_feature_extractor(model, nodes,
tracer_kwargs={"leaf_modules": [RobustAttention]})``.
"""

from __future__ import annotations

import functools

from ...attention import RobustAttention


@functools.cache
def register_fx_leaf() -> None:
    """Register RobustAttention with timm's no-trace modules (once; later calls do nothing).
    Without timm installed there is no timm tracer to tell: nothing to register."""
    try:
        from timm.layers import register_notrace_module
    except ImportError:
        return
    register_notrace_module(RobustAttention)

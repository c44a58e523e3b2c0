"""The shape of an attention module, shared by the module and every mitigation it builds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class AttentionConfig:
    """timm's Attention constructor arguments, resolved (head_dim, attn_dim and dim_out filled in)."""

    dim: int
    num_heads: int
    head_dim: int
    dim_out: int
    qkv_bias: bool
    proj_bias: bool
    norm_layer: type[nn.Module]
    device: torch.device | str | None = None
    dtype: torch.dtype | None = None

    @property
    def attn_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def factory_kwargs(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": self.dtype}

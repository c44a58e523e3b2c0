"""A small pre-LN causal transformer language model whose attention is a robust_attn variant.

    h_0 = E[x] + P                                    (token and learned position embeddings)
    h   <- h + Attn(LN(h), is_causal=True)            (robust_attn.create(variant, ...))
    h   <- h + W_2 GELU(W_1 LN(h))
    logits = W_out LN(h)

The GPT-2 layout (Radford et al. 2019) at small scale, as in Wortsman et al.
(2023), "Small-scale proxies for large-scale Transformer training
instabilities": embeddings N(0, 0.02^2), PyTorch's default init elsewhere
(each variant keeps its own attention initialisation), no dropout.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from robust_attn import RobustAttention, create


class Block(nn.Module):
    def __init__(self, variant: str, dim: int, heads: int, mlp_ratio: int, **options: Any):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = create(variant, dim, num_heads=heads, **options)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(),
                                 nn.Linear(mlp_ratio * dim, dim))

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.norm1(h), is_causal=True)
        return h + self.mlp(self.norm2(h))


class CausalLM(nn.Module):
    """Tokens (B, N) -> next-token logits (B, N, V)."""

    def __init__(self, variant: str, vocab: int, length: int, dim: int = 64, depth: int = 2,
                 heads: int = 4, mlp_ratio: int = 4, **options: Any):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.zeros(length, dim))
        self.blocks = nn.ModuleList(Block(variant, dim, heads, mlp_ratio, **options)
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens) + self.position[:tokens.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))

    def auxiliary_loss(self) -> Tensor:
        """The attention mitigations' auxiliary losses (spectral_qk), summed."""
        return sum((m.auxiliary_loss() for m in self.modules() if isinstance(m, RobustAttention)),
                   self.head.weight.new_zeros(()))

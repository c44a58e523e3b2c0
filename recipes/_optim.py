"""AdamW with timm's weight-decay groups, and a linear-warmup cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

import robust_attn


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups: weight decay on matrices and larger, none on vectors and scalars.

    Biases, norm gains, sigma_reparam's gamma and sink logits (ndim <= 1) are not
    decayed, as timm's ``param_groups_weight_decay`` does.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0}]


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, final_ratio: float) -> float:
    """The learning-rate factor: linear from 1/warmup to 1, then cosine down to ``final_ratio``.

        f(t) = (t + 1) / W                                          t < W
        f(t) = r + (1 - r) (1 + cos(pi (t - W) / (T - W))) / 2      W <= t < T
    (Loshchilov & Hutter 2017, "SGDR", without restarts; Goyal et al. 2017 for the warmup.)
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(model: nn.Module, lr: float, weight_decay: float,
          betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW over :func:`decay_groups`, with the model's after-step mitigations (QK-clip) run after
    every step (robust_attn.attach_to_optimizer)."""
    optimizer = torch.optim.AdamW(decay_groups(model, weight_decay), lr=lr, betas=betas)
    robust_attn.attach_to_optimizer(model, optimizer)
    return optimizer


def warmup_cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                           final_ratio: float = 0.0, start_step: int = 0):
    """LambdaLR following :func:`warmup_cosine`, set for training step ``start_step``.

    To resume, load the optimizer's state first (it holds each group's initial lr),
    then build the schedule at the resumed step; ``total_steps`` may differ from
    the first run's (the run is then extended on the new schedule).
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: warmup_cosine(step, warmup_steps, total_steps, final_ratio),
        last_epoch=start_step - 1)

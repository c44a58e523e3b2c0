"""Adversarial inputs for adversarial training: FGSM and PGD in an L-infinity ball.

FGSM (Goodfellow, Shlens & Szegedy 2015, "Explaining and Harnessing Adversarial
Examples", eq. 3):

    x_adv = clip_[0,1](x + eps sign(grad_x L(f(x), y)))

PGD (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial
Attacks", Section 2.1), from a uniform random start in the ball:

    x^0 = x + U(-eps, eps)
    x^(t+1) = clip_[0,1](Proj_(||. - x||_inf <= eps)(x^t + alpha sign(grad_x L(f(x^t), y))))

with alpha = 2.5 eps / steps by default (Madry et al.'s step-size rule).
Pixels are in [0, 1]; eps is in those units (e.g. 4/255).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def _input_gradient(loss_of: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    x = x.detach().requires_grad_()
    (gradient,) = torch.autograd.grad(loss_of(x), x)
    return gradient


def adversarial_inputs(classify: Callable[[Tensor], Tensor], x: Tensor, y: Tensor, eps: float,
                       steps: int = 1, alpha: float | None = None,
                       start: Tensor | None = None) -> Tensor:
    """FGSM (steps=1, no start) or PGD (``start``: a U(-1, 1) draw of x's shape, scaled by eps).

    ``classify`` maps images to logits; only input gradients are computed.
    """
    alpha = eps if steps == 1 and start is None else (alpha or 2.5 * eps / steps)
    adversarial = x if start is None else (x + eps * start).clamp(0, 1)

    def loss_of(images: Tensor) -> Tensor:
        return F.cross_entropy(classify(images).float(), y)

    for _ in range(steps):
        step = alpha * _input_gradient(loss_of, adversarial).sign()
        adversarial = torch.minimum(torch.maximum(adversarial + step, x - eps), x + eps).clamp(0, 1)
    return adversarial.detach()

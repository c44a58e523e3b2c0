"""Spectral QK: keep each head's query-key eigenspectrum concentrated (small variance, held mean).

Bao, Hataya & Karakida (2024), "Self-attention Networks Localize When
QK-eigenspectrum Concentrates" (ICML 2024, arXiv:2402.02098), characterise
attention localization by the eigenvalues of the query-key matrix
W_QK = W_Q W_K^T (C x C): a small eigenvalue variance with a non-zero mean
localizes attention, which can prevent both rank collapse and entropy collapse.
Their regulariser, LocAteR, "minimizes the eigenspectrum scale while maintaining
its mean". That much is the paper (we did not have LocAteR's exact formula at
hand); the statistics' normalisation, the loss and the init below are ours.

Per head h, with W_Q^h, W_K^h the (D, C) row blocks of qkv (torch's layout, so
the logits are x_i^T W_Q^h^T W_K^h x_j), we work with the D x D matrix

    M_h = W_K^h W_Q^h^T,

whose eigenvalues are the non-zero eigenvalues of W_Q^h^T W_K^h (the paper's
W_QK, taken per head; AB and BA share their non-zero eigenvalues), padded with
zeros up to D. Normalisation (our decision): over those D eigenvalues, not over
the C eigenvalues of the C x C matrix, whose C - D extra zeros come from the
head's rank and would tie every statistic to the model width::

    mean     mu_h = tr(M_h) / D
    variance      = tr(M_h M_h) / D - mu_h^2          (= E[l^2] - E[l]^2)

For real eigenvalues (e.g. a symmetric W_QK) this is the usual variance; complex
eigenvalues (conjugate pairs) can make it negative, so it cannot serve as a
loss (a rotation-like M would drive it to minus infinity). The loss uses the
Frobenius spread instead::

    spread_h = ||M_h - mu_h I||_F^2 / D  =  ||M_h||_F^2 / D - mu_h^2
    auxiliary_loss = weight * mean_h spread_h

By Schur's inequality spread_h >= E|l - mu_h|^2 >= variance, with equality for
normal M_h with real eigenvalues; spread_h = 0 exactly when M_h = mu_h I, i.e.
when W_Q^h^T W_K^h is mu_h times a (rank-D, generally oblique) projector. Its
gradient in M, 2 (M - mu I) / D, is traceless, so a step in M holds the mean;
through the factors W_Q^h, W_K^h it holds it to the extent that
W_Q^h W_Q^h^T + W_K^h W_K^h^T is isotropic. Note that the loss alone also falls
when W_QK shrinks as a whole, and with a mean near 0 (as at a random init) that
pulls W_QK towards 0, i.e. uniform attention: hence the concentrated init.

Concentrated init (ours): W_K^h <- c_h (W_Q^h)^+T, so M_h = c_h I exactly
(when D <= C; otherwise M_h = c_h times a projector of rank C). W_Q^h keeps
nn.Linear's draw, and c_h > 0 makes ||W_K^h||_F = ||W_Q^h||_F.

Health (keys prefixed ``spectral_qk.``), per head (H,): ``eigenvalue_mean``,
``eigenvalue_variance`` and ``spread``, of W_QK itself (the logits use
scale * W_QK, whose eigenvalues are scale times these).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from einops import rearrange
from torch import Tensor, nn

from ..claim import ENTROPY, RANK, Claim, witnesses_at
from ..config import AttentionConfig
from .base import HostLayers, Mitigation

DEFAULT_WEIGHT = 0.01  # our choice, not tuned
# Largest loss weight (our choice): the spread is O(1) at a fresh init, so a larger weight makes the
# auxiliary loss dominate any task loss; and weight * spread stays finite in float32.
MAX_WEIGHT = 1e4


def qk_products(qkv_weight: Tensor, num_heads: int) -> Tensor:
    """M_h = W_K^h W_Q^h^T for every head, (H, D, D) in float32, from qkv's (3 H D, C) weight."""
    w_q, w_k, _ = rearrange(qkv_weight.float(), "(qkv h d) c -> qkv h d c", qkv=3, h=num_heads)
    return w_k @ w_q.transpose(-1, -2)


def _trace_mean(products: Tensor) -> Tensor:
    return products.diagonal(dim1=-2, dim2=-1).mean(dim=-1)


def eigenvalue_moments(products: Tensor) -> tuple[Tensor, Tensor]:
    """(mean, variance) of each (..., D, D) matrix's D eigenvalues, from traces (see above)."""
    mean = _trace_mean(products)
    second_moment = (products * products.transpose(-1, -2)).sum(dim=(-2, -1)) / products.shape[-1]
    return mean, second_moment - mean.square()


def eigenvalue_spread(products: Tensor) -> Tensor:
    """||M - mu I||_F^2 / D of each (..., D, D) M: >= the eigenvalue variance, 0 iff M = mu I."""
    mean = _trace_mean(products)
    identity = torch.eye(products.shape[-1], device=products.device, dtype=products.dtype)
    centred = products - mean[..., None, None] * identity
    return centred.square().sum(dim=(-2, -1)) / products.shape[-1]


@torch.no_grad()
def concentrate_qk_spectrum_(qkv_weight: Tensor, num_heads: int) -> None:
    """In place: W_K^h <- c_h (W_Q^h)^+T with ||W_K^h||_F = ||W_Q^h||_F, so M_h = c_h I."""
    attn_dim = qkv_weight.shape[0] // 3
    w_q = rearrange(qkv_weight[:attn_dim].float(), "(h d) c -> h d c", h=num_heads)
    direction = torch.linalg.pinv(w_q).transpose(-1, -2)
    scale = w_q.norm(dim=(-2, -1)) / direction.norm(dim=(-2, -1))
    w_k = scale[:, None, None] * direction
    qkv_weight[attn_dim:2 * attn_dim].copy_(rearrange(w_k, "h d c -> (h d) c"))


class SpectralQK(Mitigation):
    """Concentrates the QK eigenspectrum of the host's qkv at initialisation and regularises
    it (module docstring).

    Option ``spectral_qk``: True (weight DEFAULT_WEIGHT) or a weight >= 0 for the
    auxiliary loss; 0 keeps the init and the health, without a loss. It builds no layer: qkv
    is the host's plain nn.Linear, so timm state dicts load strictly (loaded weights replace
    the init), and its stages read the host's qkv when called (``layers["qkv"]``).
    """

    option = "spectral_qk"
    claims = (
        Claim(
            "spectral_qk", "this library's method, inspired by Bao, Hataya & Karakida 2024, ICML "
                           "(arXiv 2402.02098)",
            "(the paper) a concentrated QK eigenspectrum (small variance, non-zero mean) "
            "localises attention and can prevent both rank collapse and entropy collapse; its "
            "regulariser LocAteR is not implemented here (we could not read its formula): our "
            "loss and concentrated init are our own derivation",
            note="Measured: neither at initialisation. The init makes M_h = c_h I, so each query "
                 "attends to itself: where that dominates (the table's sqk 16) the tokens keep "
                 "their rank but the rows are one-hot (H 0.000: entropy collapse); at sqk 1 the "
                 "stack collapses in rank as the baseline's does. Our loss is exactly 0 at that "
                 "init, so it gives no gradient there: it only pulls a drifting spectrum back "
                 "during training.",
            witnesses=witnesses_at("spectral_qk", RANK, ENTROPY),
        ),
    )
    # Concentrated QK-eigenspectrum init plus its regulariser (weight 0.01).
    presets = {"spectral_qk": {"spectral_qk": True}}
    conflicts = {
        "qk_norm": "qk_norm normalises q and k per token, so the logits no longer follow the "
                   "bilinear form x^T W_Q^h^T W_K^h x whose eigenspectrum spectral_qk shapes",
        "sigma_reparam": "sigma_reparam's W_hat = gamma W / sigma(W) does not change when W "
                         "shrinks, so spectral_qk's loss on W could fall by shrinking W alone, "
                         "without changing the attention",
    }

    def __init__(self, config: AttentionConfig, weight: float) -> None:
        super().__init__()
        self.loss_weight = weight
        self.num_heads = config.num_heads

    @classmethod
    def from_option(cls, value: Any, config: AttentionConfig) -> SpectralQK | None:
        if value is None or value is False:
            return None
        if value is True:
            return cls(config, DEFAULT_WEIGHT)
        if (not isinstance(value, (int, float)) or not math.isfinite(value)
                or not 0 <= value <= MAX_WEIGHT):
            raise ValueError(f"spectral_qk={value!r}: expected True, a loss weight in "
                             f"[0, {MAX_WEIGHT:g}] such as {DEFAULT_WEIGHT}, False or None")
        return cls(config, float(value))

    @torch.no_grad()
    def initialise_weights(self, layers: HostLayers) -> None:
        """Concentrate the spectrum of the host's freshly drawn qkv (at construction, after a
        custom init)."""
        concentrate_qk_spectrum_(layers["qkv"].weight, self.num_heads)

    def auxiliary_loss(self, layers: HostLayers) -> Tensor:
        products = qk_products(layers["qkv"].weight, self.num_heads)
        return self.loss_weight * eigenvalue_spread(products).mean()

    @torch.no_grad()
    def health(self, layers: HostLayers, call=None) -> dict[str, Tensor]:
        products = qk_products(layers["qkv"].weight, self.num_heads)
        mean, variance = eigenvalue_moments(products)
        return {"eigenvalue_mean": mean, "eigenvalue_variance": variance,
                "spread": eigenvalue_spread(products)}

    def keeps_function(self, source: nn.Module) -> bool:
        return True  # converted weights replace the init; the loss changes training only

    def timm_expressible(self, host: nn.Module) -> bool:
        return True  # a loss only: the weights are plain

    def extra_repr(self) -> str:
        return f"weight={self.loss_weight}"

"""Pieces shared by the tests that check a mitigation against its eager matrix form in float64."""

import copy
import math

import torch


def float64_mask(mask):
    """The mask in float64 if it is a float mask; a bool mask or None unchanged."""
    return mask.double() if mask is not None and mask.is_floating_point() else mask


def scores_and_allowed(scale, q, k, attn_mask, causal):
    """scale q k^T (plus a float mask) and the bool allowed: the user's mask and the causal triangle."""
    scores = scale * q @ k.transpose(-2, -1)
    allowed = torch.ones_like(scores, dtype=torch.bool)
    if attn_mask is not None:
        allowed = allowed & (attn_mask if attn_mask.dtype == torch.bool else attn_mask > -math.inf)
        scores = scores if attn_mask.dtype == torch.bool else scores + attn_mask
    if causal:
        allowed = allowed & torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
    return scores, allowed


def forward_backward(module, forward, x):
    """forward(x), then backward of <out, cos(out)>: (out, dx, {parameter name: grad})."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    out = forward(x)
    out.backward(torch.cos(out.detach()))
    return out, x.grad, {name: p.grad for name, p in module.named_parameters()}


def assert_same_forward_and_backward(actual, expected):
    """Two forward_backward results agree to 1e-10: output, dx and every parameter's grad."""
    torch.testing.assert_close(actual[0], expected[0], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(actual[1], expected[1], atol=1e-10, rtol=1e-10,
                               msg=lambda m: f"dx: {m}")
    assert actual[2].keys() == expected[2].keys()
    for name, grad in expected[2].items():
        torch.testing.assert_close(actual[2][name], grad, atol=1e-10, rtol=1e-10,
                                   msg=lambda m, name=name: f"grad of {name}: {m}")


def outlier_removal_terms(module, forward, x) -> tuple[float, dict[str, float]]:
    """The output's scale and each gradient's ({"x": .., parameter name: ..}) for ``module``
    without its outlier removal; (0, {}) without one. Outlier removal computes (A - U) V as the
    difference of two terms of A V's size, so its rounding is set by their scale, not by the
    difference's (exactly 0 with one key): the error model's floor for the output and each
    gradient (robust_attn.testing.tolerances). ``forward(module, inputs)`` runs the module."""
    if "outlier_removal" not in module.mitigations:
        return 0.0, {}
    plain = copy.deepcopy(module)
    del plain.mitigations["outlier_removal"]
    out, dx, grads = forward_backward(plain, lambda inputs: forward(plain, inputs), x)
    scales = {name: g.abs().max().item() for name, g in {"x": dx, **grads}.items()
              if g is not None and g.numel()}
    return out.detach().abs().max().item(), scales

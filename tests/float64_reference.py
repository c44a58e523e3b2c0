"""Pieces shared by the tests that check a mitigation against its eager matrix form in float64."""

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


def with_sink_columns(module, q, v, token_logits):
    """(logits, values) with the module's sinks in front of the tokens' own ``token_logits``
    (B, H, N, N, masked) and ``v``, as the sinks mitigation prepends them: sink tokens' columns
    scale q k_s with their values, and in front of all a sink logit's column s_h with a zero
    value."""
    columns, values = [token_logits], [v]
    extras = module.mitigations
    if "sink_tokens" in extras:
        columns.insert(0, module.scale * q @ extras["sink_tokens"].key.mT)
        values.insert(0, extras["sink_tokens"].value.expand(v.shape[0], -1, -1, -1))
    if "sink_logit" in extras:
        columns.insert(0, extras["sink_logit"].logit.view(1, -1, 1, 1).expand(*q.shape[:-1], 1))
        values.insert(0, torch.zeros_like(v[:, :, :1]))
    return torch.cat(columns, dim=-1), torch.cat(values, dim=-2)


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


def forward_backward_with_scales(module, forward, x):
    """:func:`forward_backward` of a RobustAttention, and bounds on the terms that cancel in its
    output and weight gradients, from hooks on the same run:
    (result, {"output": ..., "qkv.weight": ..., "proj.weight": ...}).

    Error analysis (Higham 2002, section 4.2: a computed sum's error is at most about eps times
    the sum of its terms' magnitudes, however small the sum itself):

    - output = proj(a) + b: its terms are W_hat a and b, each up to max |out - b| and max |b|;
      with C = 1 they can cancel to a hundredth of either.
    - qkv.weight: dW[r, c] = sum over tokens of dqkv[r] x[c]. Per token and head, softmax's
      backward dS_ij = p_ij (dP_ij - delta_i), dP_ij = dO_i . v_j, delta_i = dO_i . O_i, so
      |dq_i| and |dk_j| terms are at most 2 scale |dO_i| max|v| max|k| (and max|q|), and dv_j's
      (p_ij + u_ij) dO_i (outlier removal subtracts the uniform u) at most 2 |dO_i|: summed over
      tokens, times max |x|. dO is the gradient at proj's input (after gates, which are <= 1).
    - x: dx_ic = sum_r W_qkv[r, c] dqkv_ir, the same token bounds times max_c sum_r |W_qkv[r, c]|.
      These cancel exactly where the attention output does not depend on q and k (one key:
      p = 1, dq = dk = 0) and, with outlier removal, on v: the fused kernels then return
      rounding residues of these terms (its backward computes delta_i and dP_ij differently).
    - outlier removal, a = (A - U) V: each entry is the difference of two convex combinations
      of v's entries, so its terms are up to max |v| (a is exactly 0 with one key); the output
      proj(a) and proj's weight gradient, sum over tokens of dy a, inherit them.
    - q_norm, k_norm: their weight and bias gradients sum the dq (dk) terms above, times the
      normalised q (k) for the weight, whose entries are at most sqrt(D) (a LayerNorm's output
      has norm sqrt(D) before its affine map).
    - sigma_reparam: dW = (gamma / sigma) (G - <G, W_hat> u v^T / gamma), G = dL/dW_hat: the
      projection removes the component along W_hat (W_hat does not change when W is scaled),
      cancelling terms of size (gamma / sigma) |G|; for a 1 x 1 weight everything cancels
      (W_hat = gamma sign(W)), dW = 0 exactly. d gamma = <G, W> / sigma sums every entry's
      G_ij W_ij / sigma: terms up to max |G| sum |W| / sigma (a long, cancelling sum).
    """
    from robust_attn.mitigations.sigma_reparam import SigmaReparamLinear

    seen = {}
    hooks = [
        module.qkv.register_forward_hook(lambda m, inputs, out: seen.update(x=inputs[0].detach(),
                                                                           qkv=out.detach())),
        module.q_norm.register_forward_hook(lambda m, inputs, out: seen.update(q=out.detach())),
        module.k_norm.register_forward_hook(lambda m, inputs, out: seen.update(k=out.detach())),
        module.proj.register_forward_hook(lambda m, inputs, out: seen.update(a=inputs[0].detach(),
                                                                            out=out.detach())),
        module.proj.register_full_backward_hook(
            lambda m, grad_in, grad_out: seen.update(dO=grad_in[0].detach(),
                                                     dy=grad_out[0].detach())),
    ]
    try:
        result = forward_backward(module, forward, x)
    finally:
        for hook in hooks:
            hook.remove()
    heads = module.num_heads
    d_out = seen["dO"].unflatten(-1, (heads, -1)).norm(dim=-1).amax(dim=-1)  # (B, N) per token
    values = seen["qkv"].unflatten(-1, (3, heads, -1))[..., 2, :, :]
    v = values.norm(dim=-1).amax()
    q = seen["q"].norm(dim=-1).amax() if seen["q"].numel() else seen["q"].new_zeros(())
    k = seen["k"].norm(dim=-1).amax() if seen["k"].numel() else seen["k"].new_zeros(())
    per_token = d_out * (2 * module.scale * v * (q + k) + 2)
    x_max = seen["x"].abs().amax() if seen["x"].numel() else 0.0
    scales = {"qkv.weight": float(per_token.sum() * x_max)}
    if per_token.numel():
        scales["x"] = float(per_token.amax() * _weight(module.qkv).abs().sum(dim=0).amax())
    bias = module.proj.bias
    proj_terms = seen["dy"].abs().amax(dim=-1).sum() * (seen["a"].abs().amax()
                                                        if seen["a"].numel() else 0.0)
    scales["proj.weight"] = float(proj_terms)
    if bias is not None and seen["out"].numel():
        terms = (seen["out"] - bias).abs().amax()
        scales["output"] = float(torch.maximum(terms, bias.detach().abs().amax()).detach())
    if "outlier_removal" in module.mitigations and values.numel():  # (A - U) V: terms <= max |v|
        v_entries = values.abs().amax()
        output_terms = _weight(module.proj).abs().sum(dim=1).amax() * v_entries
        scales["output"] = max(scales.get("output", 0.0), float(output_terms))
        gradient_terms = seen["dy"].abs().amax(dim=-1).sum() * v_entries
        scales["proj.weight"] = max(scales["proj.weight"], float(gradient_terms))
    for norm in ("q_norm", "k_norm"):  # a LayerNorm's gradients sum dq (dk) terms
        for key, factor in (("weight", module.head_dim ** 0.5), ("bias", 1.0)):
            if getattr(getattr(module, norm), key, None) is not None:
                scales[f"{norm}.{key}"] = float(per_token.sum()) * factor
    for name in ("qkv", "proj"):
        layer = getattr(module, name)
        if isinstance(layer, SigmaReparamLinear):
            sigma = layer.sigma().detach().abs()
            # d gamma = sum_ij G_ij W_ij / sigma: terms up to max |G| |W_ij| / sigma
            scales[f"{name}.gamma"] = scales[f"{name}.weight"] * float(
                layer.weight.detach().float().abs().sum() / sigma)
            scales[f"{name}.weight"] *= float(layer.gamma.detach().float().abs() / sigma)
    return result, scales


def _weight(layer):
    """The weight a linear layer computes with (sigma_reparam's W_hat), detached."""
    from robust_attn.mitigations.sigma_reparam import SigmaReparamLinear

    return (layer.effective_weight() if isinstance(layer, SigmaReparamLinear)
            else layer.weight).detach()

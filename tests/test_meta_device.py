"""Issue 16, finding 2: modules on the meta device (FSDP's deferred initialisation).

Every preset runs shape inference on meta, forward and backward (the overflow check's
autocast query and sigma_reparam's autocast-off context raised there), and a module built on
meta, materialised with ``to_empty``, then filled by ``reset_parameters()`` (fresh weights) or
by ``load_state_dict`` + ``reset_from_weights()`` (loaded weights), computes what a module
built on the CPU computes.
"""

import pytest
import torch

from robust_attn import create, list_variants

DIM, HEADS = 32, 4
# 70 tokens: block_sparse's pattern is dense at this length (its sdpa fallback); 256 runs its kernel.
LENGTHS = (7, 256)
pytestmark = pytest.mark.filterwarnings("ignore::robust_attn.kernels.SparseFallbackWarning")


@pytest.mark.parametrize("preset", list_variants())
@pytest.mark.parametrize("tokens", LENGTHS)
def test_every_preset_infers_shapes_on_meta(preset, tokens):
    module = create(preset, DIM, num_heads=HEADS, device="meta")
    x = torch.randn(2, tokens, DIM, device="meta", requires_grad=True)
    out = module(x, attn_mask=torch.ones(tokens, tokens, dtype=torch.bool, device="meta"))
    assert out.shape == (2, tokens, DIM) and out.device.type == "meta"
    out.sum().backward()
    assert x.grad.shape == x.shape


def _seeded_input(tokens: int) -> torch.Tensor:
    return torch.randn(2, tokens, DIM, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("preset", list_variants())
def test_built_on_meta_then_reset_parameters_runs_like_a_fresh_module(preset):
    module = create(preset, DIM, num_heads=HEADS, device="meta").to_empty(device="cpu")
    module.reset_parameters()
    fresh = create(preset, DIM, num_heads=HEADS)
    fresh_buffers = dict(fresh.named_buffers())
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        # finite, unless a fresh module starts it non-finite too (a running maximum at -inf)
        assert torch.isfinite(tensor).all() or torch.equal(tensor, fresh_buffers.get(name)), name
    x = _seeded_input(LENGTHS[0])
    out = module(x)
    assert torch.isfinite(out).all()
    # the same kind of initialisation: weights of the same scale as a module built on the CPU
    torch.testing.assert_close(module.qkv.weight.std(), fresh.qkv.weight.std(), rtol=0.2, atol=0)
    if "sigma_reparam" in module.mitigations:  # u, v are W's singular vectors: sigma(W) = ||W||_2
        for layer in (module.qkv, module.proj):
            torch.testing.assert_close(layer.sigma(), torch.linalg.matrix_norm(layer.weight, 2))
            assert layer.gamma.item() == 1.0
    if "spectral_qk" in module.mitigations:  # the concentrated spectrum: spread 0 at init
        spread = module.mitigations["spectral_qk"].health(module.layers_by_role())["spread"]
        assert spread.abs().max() < 1e-5


@pytest.mark.parametrize("preset", [*list_variants(), "off_by_one"])
def test_built_on_meta_then_loaded_computes_what_the_source_computes(preset):
    options = {"sink_logit": "off_by_one"} if preset == "off_by_one" else {}
    source = create("baseline" if options else preset, DIM, num_heads=HEADS, **options).eval()
    module = create("baseline" if options else preset, DIM, num_heads=HEADS, device="meta",
                    **options).to_empty(device="cpu")
    module.load_state_dict(source.state_dict())
    module.reset_from_weights()  # derived and non-persistent state (sigma's u, v; a fixed sink logit)
    module.eval()
    for tokens in LENGTHS:
        x = _seeded_input(tokens)
        torch.testing.assert_close(module(x), source(x), rtol=1e-5, atol=1e-6)

"""torch.export: every preset in eval mode, its reparametrisations folded, exports
(``torch.export.export(module, (x,))``, the default non-strict tracing) and the exported program
computes the module's outputs."""

import copy

import pytest
import torch
from torch import nn

from robust_attn.mitigations.sigma_reparam import fold_sigma_reparam
from robust_attn.presets import create, list_variants

DIM, HEADS = 32, 4
# block_sparse's kernel runs from 256 tokens (see tests/test_compile.py); at 16 its pattern is
# dense at the kernel's block size and runs on SDPA with a mask: both are exported.
TOKENS = {"block_sparse": [16, 256]}


def _case(preset: str, tokens: int) -> tuple[nn.Module, torch.Tensor]:
    x = torch.randn(2, tokens, DIM, generator=torch.Generator().manual_seed(1))
    return create(preset, DIM, HEADS).eval(), x


@pytest.mark.parametrize("preset, tokens", [(preset, tokens) for preset in list_variants()
                                            for tokens in TOKENS.get(preset, [16])])
@pytest.mark.filterwarnings("ignore:sparsity pattern")  # block_sparse's dense fallback at 16
def test_every_preset_exports_in_eval_mode_and_gives_the_modules_outputs(preset, tokens):
    module, x = _case(preset, tokens)
    original = copy.deepcopy(module)
    folded = fold_sigma_reparam(module)
    assert type(folded.qkv) is nn.Linear and type(folded.proj) is nn.Linear  # plain layers
    exported = torch.export.export(folded, (x,))
    with torch.no_grad():  # after the export, so that eager mode reuses nothing export built
        expected = original(x)
        actual = exported.module()(x)
    # Folding W_hat = (gamma / sigma) W into one weight rounds differently: float32 tolerance.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)

"""Issue 15 item 2: convert and revert PyTorch's own nn.MultiheadAttention.

Every behaviour of torch's module the adapter mirrors (its masks' meanings and shapes,
batch_first, the returned weights, the encoder and decoder layers' calls) is checked against
stock nn.MultiheadAttention / nn.TransformerEncoderLayer / nn.TransformerDecoderLayer outputs.
"""

import copy

import pytest
import torch
from torch import nn

from robust_attn import convert, revert
from robust_attn.integrations.torch_mha import MultiheadRobustAttention

DIM, HEADS, FF, BATCH, LENGTH = 16, 4, 32, 2, 6
# Presets whose conversion keeps the function (sigma_reparam: gamma = sigma(W); sink: a -40
# logit; spectral_qk and qk_clip: the loaded weights as they are).
PRESERVING = ["baseline", "sigma_reparam", "sink", "spectral_qk", "qk_clip"]


def _encoder(batch_first: bool, norm_first: bool = False, dropout: float = 0.0,
             enable_nested_tensor: bool = False) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(DIM, HEADS, FF, dropout=dropout, batch_first=batch_first,
                                       norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=enable_nested_tensor)


def _tokens(batch_first: bool) -> torch.Tensor:
    return torch.randn(BATCH, LENGTH, DIM) if batch_first else torch.randn(LENGTH, BATCH, DIM)


def _padding(float_mask: bool) -> torch.Tensor:
    """(B, L): the second sequence's last two keys ignored (True = ignore, or -inf)."""
    ignored = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    ignored[1, -2:] = True
    return _additive(ignored) if float_mask else ignored


def _additive(ignored: torch.Tensor) -> torch.Tensor:
    return torch.zeros(ignored.shape).masked_fill(ignored, -torch.inf)


def _attn_mask(form: str) -> torch.Tensor:
    """torch's attn_mask in ``form``: 'bool2d', 'float2d' (L, L) or 'bool3d', 'float3d'
    (B * H, L, L), each with a different pattern per batch and head in 3-D."""
    if form.endswith("2d"):
        ignored = torch.triu(torch.ones(LENGTH, LENGTH, dtype=torch.bool), 1)
    else:
        ignored = torch.rand(BATCH * HEADS, LENGTH, LENGTH) < 0.3
        ignored[..., 0] = False  # every row keeps a key
    return _additive(ignored) if form.startswith("float") else ignored


def _converted(stock: nn.Module, preset: str) -> tuple:
    return convert(copy.deepcopy(stock), preset)


@pytest.mark.parametrize("preset", PRESERVING)
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_converted_encoder_computes_what_torch_computes(batch_first, norm_first, preset):
    stock = _encoder(batch_first, norm_first).eval()
    model, summary = _converted(stock, preset)
    assert summary.swapped == ["layers.0.self_attn", "layers.1.self_attn"]
    assert summary.preserves_function and not summary.skipped
    assert all(type(layer.self_attn) is MultiheadRobustAttention for layer in model.layers)
    x, mask, padding = _tokens(batch_first), _attn_mask("bool2d"), _padding(False)
    torch.testing.assert_close(model(x, mask=mask, src_key_padding_mask=padding),
                               stock(x, mask=mask, src_key_padding_mask=padding),
                               atol=1e-5, rtol=1e-5)


MASKS = {  # name -> (key_padding_mask form or None, attn_mask form or None)
    "padding_bool": ("bool", None), "padding_float": ("float", None),
    "bool2d": (None, "bool2d"), "float2d": (None, "float2d"),
    "bool3d": (None, "bool3d"), "float3d": (None, "float3d"),
    "padding_bool_and_bool3d": ("bool", "bool3d"),
    "padding_float_and_bool2d": ("float", "bool2d"),
    "padding_bool_and_float3d": ("bool", "float3d"),
}


def _masks(name: str) -> dict:
    padding, attn = MASKS[name]
    return {"key_padding_mask": None if padding is None else _padding(padding == "float"),
            "attn_mask": None if attn is None else _attn_mask(attn)}


@pytest.mark.filterwarnings("ignore:Support for mismatched")  # torch's own, on mixed masks
@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("batch_first", [True, False])
def test_every_mask_form_as_torch_reads_it(batch_first, mask):
    stock = nn.MultiheadAttention(DIM, HEADS, batch_first=batch_first).eval()
    adapter, _ = _converted(stock, "sigma_reparam")
    x, masks = _tokens(batch_first), _masks(mask)
    for average in (True, False):
        expected = stock(x, x, x, average_attn_weights=average, **masks)
        got = adapter(x, x, x, average_attn_weights=average, **masks)
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    out, weights = adapter(x, x.clone(), x.clone(), need_weights=False, **masks)  # equal tensors
    assert weights is None
    torch.testing.assert_close(out, expected[0], atol=1e-5, rtol=1e-5)


def test_is_causal_with_its_mask_as_torch():
    stock = nn.MultiheadAttention(DIM, HEADS, batch_first=True).eval()
    adapter, _ = _converted(stock, "baseline")
    x, causal = _tokens(True), nn.Transformer.generate_square_subsequent_mask(LENGTH)
    expected = stock(x, x, x, attn_mask=causal, is_causal=True, need_weights=False)[0]
    torch.testing.assert_close(adapter(x, x, x, attn_mask=causal, is_causal=True,
                                       need_weights=False)[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(adapter(x, x, x, is_causal=True, need_weights=False)[0], expected,
                               atol=1e-5, rtol=1e-5)


def test_weights_leave_out_prepended_sink_keys():
    stock = nn.MultiheadAttention(DIM, HEADS, batch_first=True).eval()
    adapter, _ = _converted(stock, "sink")
    x = _tokens(True)
    weights = adapter(x, x, x, average_attn_weights=False)[1]
    assert weights.shape == (BATCH, HEADS, LENGTH, LENGTH)
    torch.testing.assert_close(weights, stock(x, x, x, average_attn_weights=False)[1],
                               atol=1e-6, rtol=1e-5)


def test_need_weights_refused_where_attention_has_no_single_map():
    adapter, summary = _converted(nn.MultiheadAttention(DIM, HEADS, batch_first=True),
                                  "differential")
    x = _tokens(True)
    assert summary.changes_function == {"": ["differential"]}
    with pytest.raises(ValueError, match=r"need_weights=True: \['differential'\]"):
        adapter(x, x, x)
    assert adapter(x, x, x, need_weights=False)[0].shape == x.shape


def test_a_training_step_runs_and_the_reverted_model_loads_into_stock():
    torch.manual_seed(1)
    stock = _encoder(batch_first=True, dropout=0.1)
    model, _ = _converted(stock, "sigma_reparam")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, padding = _tokens(True), _padding(False)
    before = model.layers[0].self_attn.attention.qkv.weight.detach().clone()
    loss = model(x, src_key_padding_mask=padding).square().mean()
    loss.backward()
    optimizer.step()
    assert not torch.equal(model.layers[0].self_attn.attention.qkv.weight, before)

    model.eval()
    trained = model(x, src_key_padding_mask=padding)
    reverted, summary = revert(model)
    assert summary.reverted == ["layers.0.self_attn", "layers.1.self_attn"] and not summary.dropped
    assert all(type(layer.self_attn) is nn.MultiheadAttention for layer in reverted.layers)
    fresh = _encoder(batch_first=True, dropout=0.1).eval()
    fresh.load_state_dict(reverted.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x, src_key_padding_mask=padding), trained,
                               atol=1e-5, rtol=1e-5)
    assert reverted.layers[0].self_attn.dropout == 0.1 and reverted.layers[0].self_attn.batch_first


# the robust preset keeps MHA's proj bias, which outlier_removal warns defeats it
@pytest.mark.filterwarnings("ignore::robust_attn.DefeatedMitigationWarning")
@pytest.mark.parametrize("preset, dropped", [
    ("qk_norm", ["qk_norm"]), ("gated", ["gated"]), ("softcap", ["softcap"]),
    ("robust", ["qk_norm", "outlier_removal"]),  # its proj_bias=False yields to MHA's bias
])
def test_revert_refuses_what_multihead_attention_cannot_hold(preset, dropped):
    model, _ = _converted(_encoder(batch_first=True), preset)
    with pytest.raises(ValueError, match=rf"layers.0.self_attn.: \[.{dropped[0]}.[],]"):
        revert(model)
    reverted, summary = revert(model, allow_lossy=True)
    assert summary.dropped["layers.1.self_attn"] == dropped
    assert type(reverted.layers[0].self_attn) is nn.MultiheadAttention


def test_decoder_self_attention_converts_and_its_cross_attention_is_refused():
    stock = nn.TransformerDecoderLayer(DIM, HEADS, FF, dropout=0.0, batch_first=True).eval()
    model, summary = _converted(stock, "sigma_reparam")
    assert summary.swapped == ["self_attn"]
    assert "cross-attention" in summary.skipped["multihead_attn"]
    assert type(model.multihead_attn) is nn.MultiheadAttention
    x, memory = _tokens(True), torch.randn(BATCH, LENGTH + 2, DIM)
    masks = {"tgt_mask": nn.Transformer.generate_square_subsequent_mask(LENGTH),
             "tgt_is_causal": True, "tgt_key_padding_mask": _padding(True)}
    expected = stock(x, memory, **masks)
    torch.testing.assert_close(model(x, memory, **masks), expected, atol=1e-5, rtol=1e-5)
    reverted, _ = revert(model)
    fresh = nn.TransformerDecoderLayer(DIM, HEADS, FF, dropout=0.0, batch_first=True).eval()
    fresh.load_state_dict(reverted.state_dict(), strict=True)
    torch.testing.assert_close(fresh(x, memory, **masks), expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_at_call_time_is_refused():
    adapter, _ = _converted(nn.MultiheadAttention(DIM, HEADS, batch_first=True), "baseline")
    x = _tokens(True)
    with pytest.raises(ValueError, match="key is not the query"):
        adapter(x, torch.randn_like(x), x)
    with pytest.raises(ValueError, match="value is not the query"):
        adapter(x, x, torch.randn(BATCH, LENGTH + 1, DIM))


@pytest.mark.parametrize("kwargs, reason", [
    ({"add_bias_kv": True}, "add_bias_kv=True"),
    ({"add_zero_attn": True}, "add_zero_attn=True"),
    ({"kdim": 8, "vdim": 8}, "kdim=8, vdim=8 differ from embed_dim=16"),
])
def test_unsupported_multihead_attention_is_skipped_with_the_reason(kwargs, reason):
    with pytest.raises(ValueError, match=reason):
        convert(nn.MultiheadAttention(DIM, HEADS, **kwargs), "baseline")


def test_a_model_without_attention_still_raises():
    with pytest.raises(ValueError, match="found no attention-like module"):
        convert(nn.Sequential(nn.Linear(DIM, DIM), nn.ReLU()), "sigma_reparam")


@pytest.mark.parametrize("call, error, message", [
    (lambda a, x: a(x[0], x[0], x[0]), ValueError, "query must be a batched"),
    (lambda a, x: a(x, x, x, key_padding_mask=torch.zeros(BATCH, LENGTH + 1, dtype=torch.bool)),
     ValueError, r"key_padding_mask has shape \(2, 7\), expected \(B, L\) = \(2, 6\)"),
    (lambda a, x: a(x, x, x, attn_mask=torch.zeros(HEADS, LENGTH, LENGTH, dtype=torch.bool)),
     ValueError, r"attn_mask has shape \(4, 6, 6\)"),
    (lambda a, x: a(x, x, x, attn_mask=torch.zeros(LENGTH, LENGTH, dtype=torch.int64)),
     TypeError, "attn_mask must be bool"),
    (lambda a, x: a(x, x, x, key_padding_mask=[[0]]), TypeError, "key_padding_mask must be a tensor"),
])
def test_bad_input_is_refused_naming_the_argument(call, error, message):
    adapter, _ = _converted(nn.MultiheadAttention(DIM, HEADS, batch_first=True), "baseline")
    with pytest.raises(error, match=message):
        call(adapter, _tokens(True))


def test_torchs_fast_paths_are_kept_off():
    """In inference torch's encoder layer runs a fused kernel reading a packed in_proj_weight,
    and TransformerEncoder turns padded batches into nested tensors: neither may run on a
    converted model, whose function (here softcap's) is not stock attention."""
    stock = _encoder(batch_first=True, enable_nested_tensor=True).eval()
    assert stock.use_nested_tensor
    model, summary = _converted(stock, "softcap")
    assert summary.changes_function and not model.use_nested_tensor
    x, padding = _tokens(True), _padding(False)
    with_grad = model(x, src_key_padding_mask=padding)
    with torch.inference_mode():
        fast = model(x, src_key_padding_mask=padding)
        assert not fast.is_nested
        torch.testing.assert_close(fast, with_grad, atol=1e-6, rtol=1e-6)
        single = model.layers[0](x)
    torch.testing.assert_close(single, model.layers[0](x), atol=1e-6, rtol=1e-6)
    # the converted layer can still build an encoder, whose constructor reads these attributes
    with pytest.warns(UserWarning, match="_qkv_same_embed_dim was not True"):
        assert not nn.TransformerEncoder(model.layers[0], 1).use_nested_tensor


def test_a_frozen_module_stays_frozen_both_ways():
    stock = nn.MultiheadAttention(DIM, HEADS, batch_first=True).requires_grad_(False)
    adapter, _ = _converted(stock, "sigma_reparam")
    assert not any(p.requires_grad for p in adapter.attention.qkv.parameters())
    assert not any(p.requires_grad for p in adapter.attention.proj.parameters())
    reverted, _ = revert(adapter)
    assert type(reverted) is nn.MultiheadAttention
    assert not any(p.requires_grad for p in reverted.parameters())

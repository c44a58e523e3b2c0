"""robust_attn._compat: each test pins the torch behaviour a shim relies on (or works around), so
a torch release that changes it fails here first."""

from __future__ import annotations

import functools
import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch._dynamo
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

from robust_attn import _compat
from robust_attn.kernels import SparseFallbackWarning
from robust_attn.sparse import SlidingWindow, Strided
from robust_attn.sparse.pattern import and_masks, or_masks

THOROUGH = os.environ.get("ROBUST_ATTN_PROFILE") == "thorough"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_import_loads_neither_dynamo_nor_dtensor():
    """``import robust_attn`` leaves torch._dynamo, FlexAttention and torch.distributed.tensor
    unloaded (about 1.3 s together on a 2-core CPU); they load when first used."""
    heavy = ("torch._dynamo", "torch.nn.attention.flex_attention", "torch.distributed.tensor")
    code = f"import sys, robust_attn; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_assume_constant_result_sets_what_torchs_decorator_sets():
    def ours():
        return 1

    def theirs():
        return 1

    _compat.assume_constant_result(ours)
    torch._dynamo.assume_constant_result(theirs)
    assert theirs.__dict__ == ours.__dict__ == {"_dynamo_marked_constant": True}


def test_dynamo_runs_a_marked_function_eagerly_and_keeps_its_result_as_a_constant():
    calls = []

    @_compat.assume_constant_result
    def length() -> int:
        calls.append(1)
        return 3

    compiled = torch.compile(lambda x: x[:length()] * 2, fullgraph=True, backend="eager")
    x = torch.arange(5.0)
    for _ in range(3):
        torch.testing.assert_close(compiled(x), x[:3] * 2)
    assert len(calls) == 1  # at trace time only


def _warn(message: str) -> None:
    warnings.warn(message, UserWarning, stacklevel=2)


def test_dynamo_cannot_trace_a_warning_under_fullgraph():
    """Why graph_warning exists: warnings.warn breaks the graph."""
    compiled = torch.compile(lambda x: (_warn("hello"), x + 1)[1], fullgraph=True, backend="eager")
    with pytest.raises(torch._dynamo.exc.Unsupported):
        compiled(torch.ones(2))


def test_dynamo_drops_a_reorderable_logging_call_made_in_an_inlined_function():
    """Why graph_warning is not dynamo's reorderable_logging_functions: torch 2.14 replays such a
    call after the graph only when the compiled frame makes it itself. When this fails, torch
    replays inlined calls too, and that simpler route would do."""
    def warn(message: str) -> None:
        warnings.warn(message, UserWarning, stacklevel=2)

    def inner(x):
        warn("inner")
        return x + 1

    torch._dynamo.config.reorderable_logging_functions.add(warn)
    try:
        compiled = torch.compile(lambda x: inner(x) * 2, fullgraph=True, backend="eager")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled(torch.ones(2))
    finally:
        torch._dynamo.config.reorderable_logging_functions.discard(warn)
    assert caught == []


def test_aot_autograd_removes_a_custom_op_call_whose_result_is_unused():
    """Why graph_warning marks its op with has_side_effect."""
    @torch.library.custom_op("robust_attn_test::unmarked_warning", mutates_args=())
    def unmarked(message: str) -> None:
        warnings.warn(message, UserWarning, stacklevel=2)

    unmarked.register_fake(lambda message: None)

    def f(x):
        torch.ops.robust_attn_test.unmarked_warning("dropped")
        return x + 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.compile(f, fullgraph=True, backend="aot_eager")(torch.ones(2))
    assert caught == []


class _TestWarning(UserWarning):
    pass


_test_warning = _compat.graph_warning("robust_attn_test::graph_warning", _TestWarning)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", *(["inductor"] if THOROUGH else [])])
def test_a_graph_warning_in_an_inlined_function_warns_at_every_call(backend):
    def inner(x):
        _test_warning("inner")
        return x + 1

    compiled = torch.compile(lambda x: inner(x) * 2, fullgraph=True, backend=backend)
    for _ in range(2):
        with pytest.warns(_TestWarning, match="inner"):
            compiled(torch.ones(2, requires_grad=True)).sum().backward()


def test_a_module_compiled_before_any_eager_call_warns_of_a_sparse_fallback_at_every_call():
    """SparseFallbackWarning from a fullgraph-compiled module, at every call as in eager mode."""
    from robust_attn import RobustAttention

    module = RobustAttention(16, num_heads=2, sparsity=Strided(4)).eval()
    x = torch.randn(1, 8, 16)
    mask = torch.ones(1, 1, 8, 8, dtype=torch.bool)  # takes the pattern off the structured kernels
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        with pytest.warns(SparseFallbackWarning, match="falls back to kernel 'sdpa'"):
            compiled(x, attn_mask=mask)


def test_fullgraph_raises_the_recompile_limit_error_at_the_limit():
    compiled = torch.compile(lambda x: x * 2, fullgraph=True, dynamic=False, backend="eager")
    with _compat.dynamo_config_patch(recompile_limit=1):
        compiled(torch.ones(2))
        with pytest.raises(_compat.recompile_limit_error()):
            compiled(torch.ones(3))


def test_outside_tracing_modes_computes_on_real_tensors_under_fake_tensors():
    with FakeTensorMode():
        assert isinstance(torch.ones(2), FakeTensor)
        with _compat.outside_tracing_modes():
            real = torch.ones(2)
    assert not isinstance(real, FakeTensor)
    assert real.sum().item() == 2


def test_assert_async_raises_with_its_message_and_compiles_into_the_graph():
    _compat.assert_async(torch.tensor(True), "x: never")
    with pytest.raises(RuntimeError, match="x: too large"):
        _compat.assert_async(torch.tensor(False), "x: too large")

    def check(x):
        _compat.assert_async((x < 10).all(), "x: too large")
        return x + 1

    compiled = torch.compile(check, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(torch.ones(2)), torch.full((2,), 2.0))
    with pytest.raises(RuntimeError, match="x: too large"):
        compiled(torch.full((2,), 11.0))


def test_a_dtensor_exists_only_once_torch_distributed_tensor_is_loaded():
    """full_tensor and local_tensor look DTensor up in sys.modules: the class must be defined
    inside that package, so that no DTensor can exist before it is imported."""
    from torch.distributed.tensor import DTensor

    assert DTensor.__module__.startswith("torch.distributed.tensor")
    assert _compat._dtensor_class() is DTensor
    plain = torch.ones(2)
    assert _compat.full_tensor(plain) is plain and _compat.local_tensor(plain) is plain


def test_full_and_local_tensor_of_a_one_rank_dtensor():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    initialised_here = not dist.is_initialized()
    if initialised_here:
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        whole = torch.arange(6.0).reshape(3, 2)
        sharded = distribute_tensor(whole, init_device_mesh("cpu", (1,)), [Shard(0)])
        assert type(_compat.full_tensor(sharded)) is torch.Tensor
        torch.testing.assert_close(_compat.full_tensor(sharded), whole)
        torch.testing.assert_close(_compat.local_tensor(sharded), whole)
    finally:
        if initialised_here:
            dist.destroy_process_group()


def test_dynamo_traces_through_an_lru_cache():
    """Why the structural BlockMask goes through opaque_op: a compiled graph does not call an
    lru_cache, it traces (and so recomputes) what the cache wraps."""
    @functools.lru_cache
    def table(n: int) -> torch.Tensor:
        return torch.arange(n) * 2

    compiled = torch.compile(lambda x: x + table(3), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(torch.zeros(3, dtype=torch.long)), torch.arange(3) * 2)
    info = table.cache_info()
    assert info.hits == info.misses == 0


def test_an_opaque_op_runs_its_body_at_every_call_of_a_compiled_graph():
    calls = []

    def fake(n):
        return [torch.empty(n, dtype=torch.long)]

    @_compat.opaque_op("robust_attn_test::counted", fake)
    def counted(n: int) -> list[torch.Tensor]:
        calls.append(n)
        return [torch.arange(n)]

    compiled = torch.compile(lambda x: x + counted(3)[0], fullgraph=True, backend="aot_eager")
    for _ in range(3):
        torch.testing.assert_close(compiled(torch.zeros(3, dtype=torch.long)), torch.arange(3))
    assert calls == [3, 3, 3]


def test_and_or_masks_equal_flex_attentions():
    from torch.nn.attention import flex_attention

    parts = (SlidingWindow(3).mask_mod(12), Strided(4).mask_mod(12))
    zero = torch.zeros((), dtype=torch.long)
    q, k = torch.arange(12)[:, None], torch.arange(12)[None]
    for ours, theirs in ((and_masks, flex_attention.and_masks), (or_masks, flex_attention.or_masks)):
        assert torch.equal(ours(*parts)(zero, zero, q, k), theirs(*parts)(zero, zero, q, k))


def test_flex_lse_request_asks_flexattention_for_the_log_sum_exp():
    from robust_attn._compat import flex_lse_request

    request = flex_lse_request()
    assert request.lse is True and not request.max_scores


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")
def test_refuse_torchscript_is_raised_by_torch_jit_script_for_a_submodule():
    class Refusing(torch.nn.Module):
        __prepare_scriptable__ = _compat.refuse_torchscript("no TorchScript here")

        def forward(self, x):
            return x

    assert torch.jit.script(torch.nn.Sequential(torch.nn.Identity()))(torch.ones(1)) == 1
    with pytest.raises(RuntimeError, match="^no TorchScript here$"):
        torch.jit.script(torch.nn.Sequential(torch.nn.Linear(2, 2), Refusing()))


def test_the_cpu_flash_op_returns_each_rows_log_sum_exp_and_zeros_for_a_row_with_no_key():
    """_compat.cpu_flash_attention: out and lse as the math gives them; a row whose keys are all
    masked gets out = 0 and lse = 0 (not -inf: lse_merge marks such rows itself); a bool mask
    is refused (lse_merge passes an additive one)."""
    from robust_attn._compat import cpu_flash_attention, cpu_flash_attention_backward

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    mask = torch.zeros(5, 5, dtype=torch.float64)
    mask[1] = -math.inf
    out, lse = cpu_flash_attention(q, k, v, mask, 0.5)
    scores = 0.5 * q @ k.mT + mask
    assert lse.shape == (2, 3, 5) and lse.dtype == torch.float64  # float32 for float32 inputs
    torch.testing.assert_close(lse[:, :, [0, 2, 3, 4]], scores.logsumexp(-1)[:, :, [0, 2, 3, 4]])
    assert not lse[:, :, 1].any() and not out[:, :, 1].any()
    from robust_attn.kernels.eager import eager_attention
    from robust_attn.problem import AttentionProblem

    expected = eager_attention(AttentionProblem(q, k, v, 0.5, attn_mask=mask))  # zeros in row 1
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    actual = cpu_flash_attention_backward(grad, q, k, v, out, lse, mask, 0.5)
    for a, e in zip(actual, torch.autograd.grad(expected, (q, k, v), grad), strict=True):
        torch.testing.assert_close(a, e)
    with pytest.raises(RuntimeError, match="same data type as query"):
        cpu_flash_attention(q, k, v, mask == 0, 0.5)

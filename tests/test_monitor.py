"""HealthMonitor: probes only on sampled steps, exact readings, nothing changed, clean detach."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

import robust_attn
from robust_attn import HealthMonitor, RobustAttention, attention_maps, create, metrics
from robust_attn.health.monitor import (
    HEAD_METRICS,
    LAYER_METRICS,
    MonitorReport,
    map_similarity,
    presets_in_use,
)
from robust_attn.health.monitor.maps import AttentionMap
from robust_attn.studies.stack import AttentionStack, init_stack_weights


def small_stack(depth=3, dim=32, heads=2, residual=True, qk_scale=2.0):
    stack = AttentionStack(depth, dim, heads, residual=residual)
    init_stack_weights(stack, qk_scale, torch.Generator().manual_seed(0))
    return stack


def train(model, monitor, x, steps, feed_loss=True):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        loss = model(x)[-1].square().mean()
        loss.backward()
        monitor.step(loss if feed_loss else None)
        optimizer.step()
        optimizer.zero_grad()


def test_observers_are_attached_only_for_sampled_steps_and_switches_stay_untouched():
    stack = small_stack()
    seen = []
    stack.layers[1].register_forward_pre_hook(
        lambda module, args: seen.append((len(module._observers), module.probe, module.health)))
    x = torch.randn(2, 8, 32)
    with HealthMonitor(stack, every=3) as monitor:
        train(stack, monitor, x, 7)
    report = monitor.report()
    assert report.steps == [0, 3, 6]
    assert [observers for observers, _, _ in seen] == [1, 0, 0, 1, 0, 0, 1]
    assert all(probe is None and health is None for _, probe, health in seen)  # the user's own
    assert stack.layers[1].health is None and not stack.layers[1]._observers
    assert set(monitor.latest_health()) == set(monitor.modules)
    assert len(report.losses) == 7 and all(isinstance(loss, float) for loss in report.losses)


def grads_after_steps(monitor_every):
    torch.manual_seed(0)
    stack = small_stack()
    x = torch.randn(2, 8, 32)
    if monitor_every:
        with HealthMonitor(stack, every=monitor_every) as monitor:
            train(stack, monitor, x, 3)
    else:
        optimizer = torch.optim.SGD(stack.parameters(), lr=0.01)
        for _ in range(3):
            stack(x)[-1].square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    return [p.detach().clone() for p in stack.parameters()]


def test_monitoring_changes_no_weight():
    bare = grads_after_steps(None)
    for monitored in (grads_after_steps(1), grads_after_steps(2)):
        assert all(torch.equal(a, b) for a, b in zip(bare, monitored, strict=True))


def test_readings_equal_the_probe_and_metrics_computed_directly():
    torch.manual_seed(0)
    module = RobustAttention(32, num_heads=4)
    x = torch.randn(3, 10, 32)
    with HealthMonitor(module, every=1) as monitor:
        out = module(x)
        out.square().sum().backward()
        monitor.step(1.5)
    series = monitor.report().layers[0]
    probed = RobustAttention(32, num_heads=4, probe=True)
    probed.load_state_dict(module.state_dict())
    with torch.no_grad():
        probed(x)
    assert series.name == "RobustAttention" and series.heads == 4
    assert series.entropy[0] == pytest.approx(probed.health.entropy.tolist())
    assert series.max_logit[0] == pytest.approx(probed.health.max_logit.tolist())
    assert series.input_residual[0] == pytest.approx(metrics.token_residual(x).mean().item())
    assert series.input_cosine[0] == pytest.approx(
        metrics.token_cosine_similarity(x).mean().item(), abs=1e-6)
    assert series.branch_gain[0] == pytest.approx((out.norm() / x.norm()).item())
    grads = torch.cat([p.grad.flatten() for p in module.parameters()])
    assert series.grad_norm[0] == pytest.approx(grads.norm().item(), rel=1e-5)
    assert math.isnan(series.map_similarity[0])  # no attention module before it
    assert series.nonfinite == [0.0]


def test_losses_tensor_float_or_none():
    module = RobustAttention(16, num_heads=2)
    with HealthMonitor(module, every=2) as monitor:
        for loss in (torch.tensor(2.0), 1.0, None, torch.tensor([3.0])):
            module(torch.randn(1, 4, 16))
            monitor.step(loss)
        with pytest.raises(ValueError, match="scalar"):
            monitor.step(torch.ones(2))
    assert monitor.report().losses == [2.0, 1.0, None, 3.0]


def test_close_restores_switches_and_removes_hooks():
    stack = small_stack()
    stack.layers[0].probe = True
    stack.layers[2].probe = False
    monitor = HealthMonitor(stack, every=1)
    stack(torch.randn(1, 4, 32))
    monitor.close()
    assert [layer.probe for layer in stack.layers] == [True, None, False]
    assert all(not layer._forward_hooks for layer in stack.layers)
    with pytest.raises(RuntimeError, match="closed"):
        monitor.step(1.0)
    with pytest.raises(ValueError, match="no RobustAttention"):
        HealthMonitor(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="every"):
        HealthMonitor(stack, every=0)


def test_a_module_that_does_not_run_reports_nan():
    stack = small_stack()
    with HealthMonitor(stack, every=1) as monitor:
        x = torch.randn(1, 4, 32)
        stack.layers[0](x)  # only the first layer runs
        monitor.step()
    first, second = monitor.report().layers[:2]
    assert all(math.isfinite(v) for v in first.entropy[0])
    assert all(math.isnan(v) for v in second.entropy[0]) and math.isnan(second.branch_gain[0])


def test_report_to_dict_and_csv(tmp_path):
    stack = small_stack()
    with HealthMonitor(stack, every=2) as monitor:
        train(stack, monitor, torch.randn(2, 8, 32), 5)
    report = monitor.report()
    as_dict = json.loads(json.dumps(report.to_dict()))
    summary = as_dict["layers"][1]["summary"]
    assert summary["entropy"]["last"] == report.layers[1].entropy[-1]
    assert summary["grad_norm"]["max"] == max(report.layers[1].grad_norm)
    path = monitor.to_csv(tmp_path / "health.csv")
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == len(report.steps) * sum(s.heads for s in report.layers)  # 3 * 3 * 2
    assert set(rows[0]) == {"step", "layer", "head", "loss", *HEAD_METRICS, *LAYER_METRICS}
    assert float(rows[-1]["entropy"]) == pytest.approx(report.layers[-1].entropy[-1][-1])


def test_attention_maps_are_the_attention_weights():
    torch.manual_seed(0)
    module = RobustAttention(16, num_heads=2)
    x = torch.randn(2, 5, 16)
    (weights,) = attention_maps(module, x).values()
    q, k, _ = module.qkv(x).detach().reshape(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    expected = ((q[0] @ k[0].transpose(-1, -2)) * module.scale).softmax(dim=-1)
    assert torch.allclose(weights, expected, atol=1e-6)
    assert module.probe is None  # restored


def test_monitor_keeps_maps_of_the_latest_sample():
    stack = small_stack()
    x = torch.randn(2, 8, 32)
    with HealthMonitor(stack, every=1, keep_maps=True) as monitor:
        train(stack, monitor, x, 1)
        kept = monitor.attention_maps()
    assert set(kept) == {"layers.0", "layers.1", "layers.2"}
    assert kept["layers.0"].shape == (2, 8, 8)
    assert torch.allclose(kept["layers.0"].sum(-1), torch.ones(2, 8))
    with pytest.raises(RuntimeError, match="keep_maps"):
        HealthMonitor(stack).attention_maps()


def test_map_similarity_is_one_for_repeated_maps_and_ignores_head_order():
    weights = torch.rand(1, 3, 4, 6).softmax(-1)
    allowed = torch.ones(1, 1, 4, 6, dtype=torch.bool)
    same = map_similarity(AttentionMap(weights, allowed), AttentionMap(weights.flip(1), allowed))
    assert torch.allclose(same, torch.ones(3))
    uniform = AttentionMap(torch.full((1, 3, 4, 6), 1 / 6), allowed)
    assert torch.equal(map_similarity(uniform, AttentionMap(weights, allowed)), torch.zeros(3))


def test_monitors_a_converted_timm_model():
    timm = pytest.importorskip("timm")
    from robust_attn import convert

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32,
                              patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=3)
    model, _ = convert(model, "qk_norm")
    with HealthMonitor(model, every=1) as monitor:
        model(torch.randn(2, 3, 32, 32)).sum().backward()
        monitor.step()
    report = monitor.report()
    assert [s.name for s in report.layers] == ["blocks.0.attn", "blocks.1.attn"]
    assert all(math.isfinite(s.grad_norm[0]) and math.isfinite(s.map_similarity[-1])
               for s in report.layers[1:])


def test_health_curves_picture(tmp_path):
    pytest.importorskip("matplotlib")
    from robust_attn.studies.plotting import plot_health_curves

    stack = small_stack()
    with HealthMonitor(stack, every=1) as monitor:
        train(stack, monitor, torch.randn(2, 8, 32), 4)
    assert plot_health_curves(monitor.report(), tmp_path / "curves.png").stat().st_size > 10_000


def test_report_reads_back_from_csv_and_truncates(tmp_path):
    stack = small_stack()
    with HealthMonitor(stack, every=2) as monitor:
        train(stack, monitor, torch.randn(2, 8, 32), 5)
    report = monitor.report()
    path = monitor.to_csv(tmp_path / "health.csv")
    again = MonitorReport.from_csv(path, report.losses)
    assert json.dumps(again.to_dict()) == json.dumps(report.to_dict())
    sampled_only = MonitorReport.from_csv(path)
    assert sampled_only.losses == [report.losses[0], None, report.losses[2], None,
                                   report.losses[4]]
    first = report.truncated(2)
    assert first.steps == [0, 2] and len(first.losses) == 3
    assert first.layers[1].entropy == report.layers[1].entropy[:2]
    later = report.since(2)
    assert later.steps == [2, 4] and later.losses[:2] == [None, None]
    assert later.layers[0].grad_norm == report.layers[0].grad_norm[1:]
    with pytest.raises(ValueError, match="samples"):
        report.truncated(4)
    with pytest.raises(FileNotFoundError, match="health.csv"):
        MonitorReport.from_csv(tmp_path / "missing.csv")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a HealthMonitor CSV"):
        MonitorReport.from_csv(tmp_path / "other.csv")


def test_presets_in_use():
    assert presets_in_use([RobustAttention(16, 2)]) == frozenset()
    assert presets_in_use([create("sigmoid", 16, 2)]) == {"sigmoid", "qk_norm"}
    assert presets_in_use([RobustAttention(16, 2), create("sink", 16, 2)]) == {"sink"}
    with HealthMonitor(small_stack(), every=1) as monitor:
        assert monitor.in_use == frozenset()


class LastOutput(nn.Module):
    def __init__(self, stack):
        super().__init__()
        self.stack = stack

    def forward(self, x):
        return self.stack(x)[-1]


def test_readme_monitor_snippet_runs(tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Monitoring training: `HealthMonitor` and early warnings")[1]
    snippet = section.split("```python\n")[1].split("```")[0]
    model = LastOutput(small_stack())
    monkeypatch.chdir(tmp_path)
    namespace = {"robust_attn": robust_attn, "model": model,
                 "loader": [(torch.randn(2, 8, 32), torch.zeros(2, 8, 32))] * 2
                 + [(torch.full((2, 8, 32), math.nan), torch.zeros(2, 8, 32))],  # a warning
                 "criterion": nn.functional.mse_loss,
                 "optimizer": torch.optim.SGD(model.parameters(), lr=0.01)}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["warning"].code == "divergence"  # the loop body ran
    assert (tmp_path / "health.csv").exists() and namespace["report"]["steps"] == [0]

"""The recipes: their parts, a short built-in run of each, and DDP against one process."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import robust_attn

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
sys.path.insert(0, str(RECIPES))

pytest.importorskip("timm")
import finetune_timm  # noqa: E402
import lr_sensitivity  # noqa: E402
from _adversarial import adversarial_inputs  # noqa: E402
from _logging import read_csv  # noqa: E402
from _markov import MarkovChain  # noqa: E402
from _optim import warmup_cosine  # noqa: E402
from _synthetic_images import SyntheticGratings  # noqa: E402
from finetune_timm import StepBatches  # noqa: E402
from lr_sensitivity import Run  # noqa: E402

# One CPU thread per process: the recipes' tests start several processes at once.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(*args, timeout=120):
    result = subprocess.run([sys.executable, *map(str, args)], env=ENV, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _torchrun(*args, timeout=120):
    return _run("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                timeout=timeout)


def _close(a, b, rtol=1e-4, atol=1e-5):
    return all(math.isclose(x, y, rel_tol=rtol, abs_tol=atol) for x, y in zip(a, b, strict=True))


# --- parts -------------------------------------------------------------------------------------

def test_markov_entropy_rate_is_the_closed_form_and_the_samples_floor():
    a, b = 0.2, 0.7  # the two-state chain 0 -> 1 with probability a, 1 -> 0 with b
    chain = MarkovChain(torch.tensor([[1 - a, a], [b, 1 - b]], dtype=torch.float64), 2, 1)

    def h(p):
        return -p * math.log(p) - (1 - p) * math.log(1 - p)

    expected = (b * h(a) + a * h(b)) / (a + b)
    assert math.isclose(chain.entropy_rate(), expected, rel_tol=1e-9)
    tokens = chain.sample(2000, 50, torch.Generator().manual_seed(0))
    assert math.isclose(chain.nll(tokens).mean().item(), expected, rel_tol=0.02)
    first = tokens[:, 0].double().mean().item()  # started from pi = (b, a) / (a + b)
    assert math.isclose(first, a / (a + b), abs_tol=0.03)


def test_markov_samples_follow_the_second_order_transitions():
    chain = MarkovChain.random(vocab=3, order=2, alpha=0.5, seed=1)
    tokens = chain.sample(4000, 40, torch.Generator().manual_seed(2))
    state = tokens[:, :-2] * 3 + tokens[:, 1:-1]
    counts = torch.zeros(9, 3, dtype=torch.float64).index_put_(
        (state.flatten(), tokens[:, 2:].flatten()), torch.ones(state.numel(), dtype=torch.float64),
        accumulate=True)
    frequencies = counts / counts.sum(dim=1, keepdim=True)
    assert torch.allclose(frequencies, chain.transitions, atol=0.03)


def test_lr_sensitivity_caps_at_the_initial_loss():
    runs = [Run("v", 1e-3, 3.0, 2.0), Run("v", 1e-2, 3.0, 1.5), Run("v", 1e-1, 3.0, math.nan),
            Run("v", 3e-1, 3.0, 9.0)]
    # min(L, L_0) = 2.0, 1.5, 3.0, 3.0; best 1.5
    assert math.isclose(lr_sensitivity.lr_sensitivity(runs), (0.5 + 0 + 1.5 + 1.5) / 4)
    assert lr_sensitivity.lr_sensitivity(runs[1:2]) == 0.0


def test_warmup_cosine_rises_linearly_then_decays_to_the_final_ratio():
    factors = [warmup_cosine(t, 4, 20, 0.1) for t in range(20)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(x >= y for x, y in zip(factors[3:], factors[4:], strict=False))
    assert math.isclose(warmup_cosine(20, 4, 20, 0.1), 0.1)


def test_step_batches_do_not_depend_on_the_world_size_and_resume_exactly():
    def batches(world, rank, start=0):
        local = slice(rank * 8 // world, (rank + 1) * 8 // world)
        return list(StepBatches(30, 8, 7, start, seed=3, local=local))

    single = batches(1, 0)
    assert len(single) == 7 and all(len(set(b)) == 8 for b in single)
    assert [a + b for a, b in zip(batches(2, 0), batches(2, 1), strict=True)] == single
    assert batches(1, 0, start=4) == single[4:]
    assert single[0] != single[3]  # a new permutation each epoch (3 batches an epoch)


def test_synthetic_images_are_deterministic_and_learnable():
    train, held_out = SyntheticGratings(600, 10, 16), SyntheticGratings(200, 10, 16, offset=10**6)
    image, label = train[13]
    assert label == 3 and image.shape == (3, 16, 16) and 0 <= image.min() <= image.max() <= 1
    assert torch.equal(train[13][0], image) and not torch.equal(held_out[13][0], image)

    def features(dataset):  # power spectrum: orientation and frequency, phase-free
        images = torch.stack([dataset[i][0].mean(0) for i in range(len(dataset))])
        spectrum = torch.fft.fft2(images - images.mean(dim=(1, 2), keepdim=True)).abs()
        labels = torch.tensor([i % 10 for i in range(len(dataset))])
        return spectrum.flatten(1), labels

    x, y = features(train)
    weights = torch.linalg.lstsq(x, torch.eye(10)[y]).solution  # a least-squares classifier
    x_test, y_test = features(held_out)
    assert ((x_test @ weights).argmax(1) == y_test).float().mean() > 0.6  # chance: 0.1


def test_adversarial_inputs_stay_in_the_ball_and_raise_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 5))
    x, y = torch.rand(16, 3, 4, 4), torch.randint(0, 5, (16,))
    eps = 0.05

    def loss(images):
        return nn.functional.cross_entropy(model(images), y).item()

    fgsm = adversarial_inputs(model, x, y, eps)
    pgd = adversarial_inputs(model, x, y, eps, steps=5, start=torch.rand_like(x) * 2 - 1)
    for adversarial in (fgsm, pgd):
        assert (adversarial - x).abs().max() <= eps + 1e-6
        assert 0 <= adversarial.min() and adversarial.max() <= 1
        assert loss(adversarial) > loss(x) + 0.01
    assert loss(pgd) >= loss(fgsm) - 1e-3


# --- short built-in runs -----------------------------------------------------------------------

def test_finetune_timm_smoke_run_trains_logs_and_exports_stock_timm_weights(tmp_path):
    timm = pytest.importorskip("timm")
    out = tmp_path / "run"
    _run(RECIPES / "finetune_timm.py", "--smoke", "--steps", "4", "--out", out)
    rows = read_csv(out / "train.csv")
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    assert all(math.isfinite(float(r["loss"])) for r in rows)
    health = read_csv(out / "health.csv")  # robust_attn.HealthMonitor, every 2 steps, 2 heads
    assert {(r["step"], r["layer"], r["head"]) for r in health} == {
        (step, f"blocks.{block}.attn", head) for step in ("0", "2") for block in "01"
        for head in "01"}
    assert all(0 <= float(r["entropy"]) <= 1 for r in health)
    summary = (out / "summary.md").read_text()
    assert "| clean_accuracy |" in summary and "entropy_min" in summary
    assert "function preserved at conversion" in summary and "health warnings:" in summary

    stock = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2)
    stock.load_state_dict(torch.load(out / "timm_model.pth", weights_only=True), strict=True)


def _summary_rows(path: Path) -> dict[str, list[str]]:
    """summary.md's table: metric -> [start, end]."""
    rows = {}
    for line in path.read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and cells[0] not in ("metric", "---"):
            rows[cells[0]] = cells[1:]
    return rows


def test_finetune_timm_resumes_where_it_stopped(tmp_path):
    """A run stopped at step 2 (--stop-at) and resumed equals the uninterrupted run, and the
    resumed run's summary covers both segments."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    finetune_timm.main(["--smoke", "--steps", "4", "--no-export", "--out", str(full)])
    finetune_timm.main(["--smoke", "--steps", "4", "--stop-at", "2", "--no-export",
                        "--out", str(resumed)])
    finetune_timm.main(["--smoke", "--steps", "4", "--no-export", "--out", str(resumed),
                        "--resume", str(resumed / "checkpoint.pt")])
    rows, resumed_rows = read_csv(full / "train.csv"), read_csv(resumed / "train.csv")
    assert [int(r["step"]) for r in resumed_rows] == [0, 1, 2, 3]
    for column in ("loss", "lr", "grad_norm"):
        assert _close([float(r[column]) for r in resumed_rows], [float(r[column]) for r in rows])
    whole, segmented = _summary_rows(full / "summary.md"), _summary_rows(resumed / "summary.md")
    assert whole.keys() == segmented.keys()
    for metric, (start, end) in whole.items():  # the start column is the first segment's start
        assert _close([float(segmented[metric][0]), float(segmented[metric][1])],
                      [float(start), float(end)], rtol=1e-3), metric
    summary = (resumed / "summary.md").read_text()
    assert "4 steps in" in summary and "segments (first step, steps): (0, 2), (2, 2)" in summary


def test_finetune_timm_resumed_with_more_steps_keeps_the_first_schedule(tmp_path):
    """--steps 3, then resumed with --steps 6: the learning rate goes on along the 3-step
    schedule (at its final value) instead of jumping back up onto a 6-step cosine."""
    out = tmp_path / "run"
    finetune_timm.main(["--smoke", "--steps", "3", "--no-export", "--out", str(out)])
    first = _summary_rows(out / "summary.md")
    finetune_timm.main(["--smoke", "--steps", "6", "--no-export", "--out", str(out),
                        "--resume", str(out / "checkpoint.pt")])
    rows = read_csv(out / "train.csv")
    assert [int(r["step"]) for r in rows] == list(range(6))
    args = finetune_timm.parse_args(["--smoke"])
    expected = [args.lr * warmup_cosine(step, args.warmup, 3, args.min_lr_ratio) for step in range(6)]
    assert _close([float(r["lr"]) for r in rows], expected, rtol=1e-6, atol=0)
    lrs = [float(r["lr"]) for r in rows]
    assert all(later <= earlier for earlier, later in zip(lrs[1:], lrs[2:], strict=False))
    summary = (out / "summary.md").read_text()
    assert "6 steps in" in summary and "schedule over 3 steps" in summary
    assert _summary_rows(out / "summary.md")["clean_loss"][0] == first["clean_loss"][0]


def test_finetune_timm_include_matching_nothing_reports_what_convert_found(tmp_path):
    with pytest.raises(ValueError, match=r"blocks\.0\.attn \(Attention\): not matched by include"):
        finetune_timm.main(["--smoke", "--include", "block.*", "--out", str(tmp_path)])


def test_finetune_timm_adversarial_smoke_run(tmp_path):
    out = tmp_path / "adv"
    _run(RECIPES / "finetune_timm.py", "--smoke", "--variant", "outlier_removal", "--adv", "pgd",
         "--adv-steps", "2", "--out", out)
    summary = (out / "summary.md").read_text()
    assert "| adversarial_accuracy |" in summary
    assert "function changed at conversion by ['outlier_removal']" in summary
    assert "not exported" in summary


def test_lr_sensitivity_smoke_run_writes_table_json_and_plot(tmp_path):
    out = tmp_path / "sweep"
    _run(RECIPES / "lr_sensitivity.py", "--smoke", "--out", out)
    report = json.loads((out / "results.json").read_text())
    assert [(r["variant"], r["lr"]) for r in report["runs"]] == [
        ("baseline", 1e-3), ("baseline", 0.3), ("qk_norm", 1e-3), ("qk_norm", 0.3)]
    assert all(len(r["curve"]) == 4 and r["health"] for r in report["runs"])
    floors = report["floors"]
    assert 0 < floors["entropy_rate"] < math.log(report["config"]["vocab"])
    table = (out / "results.md").read_text()
    assert "| baseline |" in table and "| qk_norm |" in table and "LR sensitivity" in table
    assert (out / "loss_vs_lr.png").stat().st_size > 10_000


def test_lr_sensitivity_text_task_writes_the_health_file(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "text"
    lr_sensitivity.main(["--task", "text", "--variants", "baseline", "qk_norm", "--lrs", "1e-3",
                         "3e-1", "--steps", "2", "--warmup", "1", "--batch-size", "2",
                         "--seq-len", "16", "--dim", "16", "--eval-size", "4", "--no-plot",
                         "--out", str(out)])
    health = json.loads((out / "health.json").read_text())
    assert health["schema"] == "robust_attn.lr_sensitivity.health/1"
    assert set(health["variants"]) == {"baseline", "qk_norm"}
    baseline = health["variants"]["baseline"]
    assert [run["lr"] for run in baseline["runs"]] == [1e-3, 0.3]
    assert set(baseline["at_largest_lr"]) == set(health["metrics"]) == set(
        lr_sensitivity.HEALTH_KEYS)
    assert 0 <= baseline["at_largest_lr"]["entropy_min"] <= 1
    report = json.loads((out / "results.json").read_text())
    assert report["config"]["vocab"] == 128 and report["floors"]["unigram_entropy"] > 2
    assert "unigram entropy" in (out / "results.md").read_text()


def test_lr_sensitivity_text_variants_skip_presets_this_checkout_lacks():
    args = lr_sensitivity.parse_args(["--task", "text"])
    assert args.variants == [v for v in lr_sensitivity.TEXT_VARIANTS
                             if v in robust_attn.list_variants()]
    assert "baseline" in args.variants and args.order == 1


LR_TEXT = RECIPES / "results/lr_sensitivity_text/results.md"


@pytest.mark.parametrize("readme", [RECIPES.parent / "README.md", RECIPES / "README.md"])
def test_readme_lr_sensitivity_text_table_is_the_results_file(readme):
    start, end = "<!-- lr-sensitivity-text:start -->", "<!-- lr-sensitivity-text:end -->"
    block = readme.read_text().split(start)[1].split(end)[0]
    assert block.strip() == LR_TEXT.read_text().strip()


@pytest.mark.parametrize("recipe", [finetune_timm, lr_sensitivity])
def test_recipes_document_their_options(recipe, capsys):
    with pytest.raises(SystemExit):
        recipe.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--smoke" in text and "torchrun --nproc_per_node=2" in text and "Examples:" in text


# --- DDP against one process -------------------------------------------------------------------

@pytest.mark.slow
def test_finetune_timm_under_torchrun_follows_the_single_process_curve(tmp_path):
    common = ("--smoke", "--steps", "3", "--no-export")
    finetune_timm.main([*common, "--out", str(tmp_path / "one")])
    _torchrun(RECIPES / "finetune_timm.py", *common, "--out", tmp_path / "two")
    one, two = (read_csv(tmp_path / name / "train.csv") for name in ("one", "two"))
    for column in ("loss", "accuracy", "grad_norm"):
        assert _close([float(r[column]) for r in two], [float(r[column]) for r in one]), column


@pytest.mark.slow
def test_lr_sensitivity_under_torchrun_follows_the_single_process_curve(tmp_path):
    common = ("--smoke", "--variants", "sigma_reparam", "--lrs", "1e-2", "--steps", "6",
              "--no-plot")
    lr_sensitivity.main([*common, "--out", str(tmp_path / "one")])
    _torchrun(RECIPES / "lr_sensitivity.py", *common, "--out", tmp_path / "two")
    one, two = (json.loads((tmp_path / name / "results.json").read_text())["runs"][0]
                for name in ("one", "two"))
    assert two["curve"] != [] and _close(two["curve"], one["curve"])
    assert math.isclose(two["final_loss"], one["final_loss"], rel_tol=1e-4)

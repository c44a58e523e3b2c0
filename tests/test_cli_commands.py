"""robust-attn doctor (built-in and timm), diagram and bench, end to end on small settings; their
one-line errors, and their progress bars (stderr, terminals only)."""

import io
import json
import sys
from pathlib import Path

import pytest
import torch

from robust_attn.cli import BENCHMARKS, _benchmarks, main

SMALL_STACK = ["--depth", "6", "--width", "32", "--heads", "2", "--tokens", "16"]


def test_doctor_builtin_adds_warnings_and_attention_maps(tmp_path, capsys):
    assert main(["doctor", "--builtin", "--variants", "baseline", "qk_norm", "--scales", "1", "16",
                 *SMALL_STACK, "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "Per layer, baseline, attention only" in printed and "Early warnings" in printed
    report = {(r["setting"]["variant"], r["setting"]["qk_scale"], r["setting"]["residual"]):
              {w["code"] for w in r["warnings"]}
              for r in json.loads((tmp_path / "doctor.json").read_text())}
    assert "rank_collapse" in report[("baseline", 1.0, False)]  # the two failure modes
    assert "entropy_collapse" in report[("baseline", 16.0, True)]
    assert "entropy_collapse" not in report[("qk_norm", 16.0, True)]
    assert report[("baseline", 1.0, True)] == set()
    for variant in ("baseline", "qk_norm"):
        assert (tmp_path / f"attention_maps_{variant}.png").stat().st_size > 10_000


def test_doctor_says_how_to_get_pictures_without_matplotlib(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    assert main(["doctor", "--variants", "baseline", "--scales", "1", *SMALL_STACK,
                 "--out", str(tmp_path)]) == 0
    assert "no pictures: pictures need matplotlib: pip install 'robust-attn[plot]'" in \
        capsys.readouterr().out
    assert (tmp_path / "doctor.json").exists() and not (tmp_path / "stack_health.png").exists()


TIMM_MODEL = ["--model", "vit_tiny_patch16_224", "--img-size", "32", "--batch", "2"]


def test_doctor_model_converts_each_variant(tmp_path, capsys):
    pytest.importorskip("timm")
    assert main(["doctor", *TIMM_MODEL, "--variants", "baseline", "softcap",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "== baseline: 12 attention modules converted" in printed
    assert "blocks.11.attn" in printed and "warnings:" in printed
    report = json.loads((tmp_path / "doctor.json").read_text())
    assert [r["variant"] for r in report] == ["baseline", "softcap"]
    assert report[1]["changes_function"] and not report[0]["changes_function"]
    assert len(report[0]["report"]["layers"]) == 12
    assert (tmp_path / "attention_maps_softcap.png").stat().st_size > 10_000


@pytest.mark.parametrize("model_type, layers", [("llama", 2), ("gpt2", 2), ("bert", 2), ("vit", 2)])
def test_doctor_model_builds_a_tiny_transformers_model_from_its_config(tmp_path, capsys,
                                                                     model_type, layers):
    pytest.importorskip("transformers")
    assert main(["doctor", "--model", f"hf:{model_type}", "--batch", "2", "--variants",
                 "baseline", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert f"== baseline: {layers} attention modules converted" in printed
    report = json.loads((tmp_path / "doctor.json").read_text())
    grad_norms = [layer["grad_norm"][0] for layer in report[0]["report"]["layers"]]
    assert len(grad_norms) == layers and all(0 < g < float("inf") for g in grad_norms)


def test_doctor_refuses_an_unknown_transformers_type_and_timm_options_for_it(capsys):
    pytest.importorskip("transformers")
    assert main(["doctor", "--model", "hf:nosuchtype"]) == 2
    assert "'nosuchtype' is not a transformers model type" in capsys.readouterr().err
    assert main(["doctor", "--model", "hf:llama", "--num-classes", "3"]) == 2
    assert "--checkpoint and --num-classes are for timm models" in capsys.readouterr().err


def test_doctor_model_loads_a_local_checkpoint(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.qkv.weight.mul_(50.0)  # an obviously sick checkpoint: huge logits
    torch.save(model.state_dict(), tmp_path / "sick.pth")
    assert main(["doctor", *TIMM_MODEL, "--checkpoint", str(tmp_path / "sick.pth"),
                 "--variants", "baseline", "qk_norm", "--out", str(tmp_path)]) == 0
    report = {r["variant"]: {w["code"] for w in r["warnings"]}
              for r in json.loads((tmp_path / "doctor.json").read_text())}
    assert "checkpoint" in capsys.readouterr().out
    assert "logit_growth" in report["baseline"] and "logit_growth" not in report["qk_norm"]


def test_doctor_model_says_why_no_attention_was_converted(tmp_path, capsys):
    pytest.importorskip("timm")
    assert main(["doctor", "--model", "convit_tiny", "--img-size", "32", "--variants", "baseline",
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "0 attention modules converted, 12 skipped" in printed
    assert "nothing to monitor: blocks.0.attn: GPSA is not a supported timm attention class" in printed


def error_of(argv, capsys) -> str:
    """The one line a command prints on stderr for bad input (exit status 2, no traceback)."""
    capsys.readouterr()
    assert main(argv) == 2
    printed = capsys.readouterr()
    assert printed.err.startswith(f"robust-attn {argv[0]}: error: ") and printed.err.count("\n") == 1
    return printed.err


def test_doctor_model_reports_unknown_models(capsys):
    pytest.importorskip("timm")
    assert "--model: cannot build timm model 'no_such_model_exists'" in \
        error_of(["doctor", "--model", "no_such_model_exists", "--variants", "baseline"], capsys)


def test_doctor_checkpoint_errors_name_the_argument(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    missing = tmp_path / "missing.pth"
    assert f"--checkpoint {missing}: no such file" in \
        error_of(["doctor", *TIMM_MODEL, "--checkpoint", str(missing)], capsys)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert f"--checkpoint {tmp_path / 'junk.pth'}: cannot read it as a checkpoint (" in \
        error_of(["doctor", *TIMM_MODEL, "--checkpoint", str(tmp_path / "junk.pth")], capsys)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10)
    state = model.state_dict()
    state["extra.weight"] = state.pop("norm.weight")
    torch.save(state, tmp_path / "ten.pth")
    error = error_of(["doctor", *TIMM_MODEL, "--checkpoint", str(tmp_path / "ten.pth")], capsys)
    assert f"--checkpoint {tmp_path / 'ten.pth'} does not fit vit_tiny_patch16_224" in error
    assert "1 key(s) missing: norm.weight" in error and "1 key(s) unexpected: extra.weight" in error
    assert "2 key(s) of another shape (checkpoint vs model): head.weight (10, 192) vs " \
        "(1000, 192), head.bias (10,) vs (1000,)" in error


def test_doctor_num_classes_builds_the_head_a_checkpoint_has(tmp_path, capsys):
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=10)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "ten.pth")  # timm's wrapped form
    assert main(["doctor", *TIMM_MODEL, "--checkpoint", str(tmp_path / "ten.pth"),
                 "--num-classes", "10", "--variants", "baseline", "--out", str(tmp_path)]) == 0
    assert "vit_tiny_patch16_224 (checkpoint" in capsys.readouterr().out
    assert "--num-classes is for a timm model: give --model too" in \
        error_of(["doctor", "--num-classes", "10"], capsys)
    with pytest.raises(SystemExit):  # argparse: a negative count
        main(["doctor", *TIMM_MODEL, "--num-classes", "-1"])
    assert "argument --num-classes: expected an integer >= 0, got -1" in capsys.readouterr().err


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, as a user's is."""

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bars_go_to_a_terminals_stderr_unless_quiet(quiet, tmp_path, capsys, monkeypatch):
    argv = ["doctor", "--variants", "baseline", "--scales", "1", *SMALL_STACK, "--out", str(tmp_path)]
    assert main(argv) == 0
    plain = capsys.readouterr().out
    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main([*argv, *(["--quiet"] if quiet else [])]) == 0
    assert capsys.readouterr().out == plain  # stdout is the same with or without a bar
    assert ("doctor: stacks" in terminal.getvalue()) is not quiet


def test_diagram_writes_json_and_png_per_norm(tmp_path, capsys):
    assert main(["diagram", "--variants", "baseline", "sigma_reparam", "--norm", "pre", "post",
                 "--betas", "0.05", "50", "--alphas", "0", "2", *SMALL_STACK,
                 "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "healthy cells" in printed and "theory agrees" in printed
    for norm in ("pre", "post"):
        diagrams = json.loads((tmp_path / f"trainability_{norm}.json").read_text())
        assert [d["variant"] for d in diagrams] == ["baseline", "sigma_reparam"]
        assert diagrams[0]["architecture"]["norm"] == norm
        assert diagrams[0]["theory_agreement"] is not None and diagrams[1]["theory_agreement"] is None
        assert (tmp_path / f"trainability_{norm}.png").stat().st_size > 10_000


def test_bench_lists_benchmarks_only_with_whole_first_sentences(capsys):
    assert main(["bench"]) == 0
    listed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert {"speed", "speed_profile", "sparse", "monitor_overhead", "probe_overhead",
            "dense_overhead"} <= set(listed)
    assert not {"machine", "measure", "output", "speed_cases", "speed_memory",
                "speed_report"} & set(listed)  # helpers the benchmarks import
    assert listed["monitor_overhead"] == (
        "Cost of the HealthMonitor: training steps of a ViT-S with the monitor at default "
        "sampling against none, interleaved in one process.")
    assert all(description.endswith(".") for description in listed.values())
    assert "bench 'no_such_benchmark': no such benchmark; available: block_topk, claims_table, " in \
        error_of(["bench", "no_such_benchmark"], capsys)


def _results() -> dict[str, float]:
    return {str(path): path.stat().st_mtime for path in (BENCHMARKS / "results").rglob("*")}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(_benchmarks()))
def test_every_benchmark_runs_at_its_smallest_size(name, tmp_path, capfd, monkeypatch):
    """bench NAME --quick --out DIR: the benchmark's smoke run, in a fresh process, its results in
    DIR and nothing written over benchmarks/results."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # small sizes: more threads only contend
    before = _results()
    assert main(["bench", "--quiet", name, "--quick", "--out", str(tmp_path / "out")]) == 0
    assert any(Path(tmp_path / "out").iterdir())
    assert capfd.readouterr().out.strip()  # its tables or paths, through robust-attn's stdout
    assert _results() == before


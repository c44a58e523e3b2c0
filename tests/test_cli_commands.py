"""robust-attn doctor (built-in and timm), diagram and bench, end to end on small settings."""

import json
import sys

import pytest
import torch

from robust_attn.cli import main

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


def test_doctor_model_reports_unknown_models():
    pytest.importorskip("timm")
    with pytest.raises(SystemExit, match="cannot build timm model"):
        main(["doctor", "--model", "no_such_model_exists", "--variants", "baseline"])


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


def test_bench_lists_and_rejects(capsys):
    assert main(["bench"]) == 0
    listed = capsys.readouterr().out
    assert "monitor_overhead:" in listed and "probe_overhead:" in listed
    assert main(["bench", "no_such_benchmark"]) == 2
    assert "unknown benchmark" in capsys.readouterr().out

"""Issue 16, finding 8: every example in README.md and recipes/README.md runs.

Python blocks: each ```python block runs in a fresh namespace holding the names below
(what the README's examples assume is in scope; small, so each block takes seconds), in a
temporary working directory; a ``test_*`` function a block defines is called too.
Substitutions: an HTML comment right before a block (invisible on GitHub),

    <!-- readme-test: replace "A" with "B" -->

replaces the exact text A by B before running it (for downloads and sizes); a substitution
whose A is not in its block fails, so substitutions cannot go stale.

CLI: every ``robust-attn ...`` command the README shows (in code spans or blocks) runs with
``--help``; doctor, diagram and bench also run for real on small settings appended to the
README's arguments. Every ``python recipes/<script>.py`` command in recipes/README.md runs
with ``--help`` (its own runs are in tests/test_recipes.py).
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import robust_attn
from robust_attn.cli import main as cli

from .test_doctor_run import write_run

ROOT = Path(__file__).resolve().parents[1]
READMES = (ROOT / "README.md", ROOT / "recipes" / "README.md")
DIM, HEADS, TOKENS = 32, 4, 16
_BLOCK = re.compile(r"((?:<!-- readme-test: .*? -->\n)*)```python\n(.*?)```", re.S)
_REPLACE = re.compile(r'<!-- readme-test: replace "(.*?)" with "(.*?)" -->')


class _Block(nn.Module):
    """A pre-norm residual attention block."""

    def __init__(self, **options):
        super().__init__()
        self.norm = nn.LayerNorm(options.pop("dim"))
        self.attn = robust_attn.RobustAttention(self.norm.normalized_shape[0], **options)

    def forward(self, x):
        return x + self.attn(self.norm(x))


def _model() -> nn.Module:
    """Two baseline blocks whose q/k weights are scaled x8: entropy collapse at initialisation,
    so the HealthMonitor example has warnings to print."""
    model = nn.Sequential(*(_Block(dim=DIM, num_heads=HEADS) for _ in range(2)))
    with torch.no_grad():
        for block in model:
            block.attn.qkv.weight[:2 * DIM].mul_(8)
    return model


def _namespace() -> dict:
    """The names the README's examples use without defining them."""
    torch.manual_seed(0)
    model = _model()
    batches = [(torch.randn(2, TOKENS, DIM), torch.randn(2, TOKENS, DIM)) for _ in range(21)]
    return {
        "torch": torch, "nn": nn, "robust_attn": robust_attn,
        "x": torch.randn(2, TOKENS, DIM),
        "mask": torch.rand(TOKENS, TOKENS) > 0.2,
        "model": model,
        "loader": batches,
        "criterion": nn.MSELoss(),
        "optimizer": torch.optim.SGD(model.parameters(), lr=1e-3),
        # the hypothesis example's encoder: width 128, keeps entropy and rank (sigma_reparam,
        # residual connections)
        "my_encoder": nn.Sequential(*(_Block(dim=128, num_heads=4, sigma_reparam=True)
                                      for _ in range(2))),
    }


def _python_blocks():
    for readme in READMES:
        text = readme.read_text()
        for match in _BLOCK.finditer(text):
            line = text[:match.start(2)].count("\n")
            yield pytest.param(match.group(1), match.group(2),
                               id=f"{readme.relative_to(ROOT)}:{line}")


def _substituted(markers: str, code: str) -> str:
    for old, new in _REPLACE.findall(markers):
        assert old in code, f"readme-test marker: {old!r} is not in the block any more"
        code = code.replace(old, new)
    return code


@pytest.mark.filterwarnings("ignore::robust_attn.kernels.SparseFallbackWarning")
@pytest.mark.parametrize(("markers", "code"), list(_python_blocks()))
def test_every_python_block_runs(markers, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = _namespace()
    exec(compile(_substituted(markers, code), "<README block>", "exec"), namespace)  # noqa: S102
    for name, value in list(namespace.items()):
        if name.startswith("test_") and callable(value):
            value()


def _cli_commands() -> list[str]:
    """Every ``robust-attn ...`` command of README.md: code spans, and lines of code blocks."""
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"`(robust-attn [^`]+)`", text)
    found += re.findall(r"^\s*(robust-attn [^\n]+)$", text, re.M)
    commands = []
    for command in found:
        command = re.sub(r"\s+", " ", command.split("#")[0]).strip()
        command = re.sub(r" \[.*?\]", "", command)  # optional parts: [--checkpoint PATH]
        if command not in commands and not command.startswith("robust-attn["):
            commands.append(command)
    return commands


def test_the_readme_shows_these_cli_commands():
    """A guard for the two tests below: they run what the README shows."""
    assert {"robust-attn doctor", "robust-attn diagram --norm pre post",
            "robust-attn bench speed --help"} <= set(_cli_commands())


@pytest.mark.parametrize("command", _cli_commands())
def test_every_readme_cli_command_has_help(command, capsys):
    words = command.split()[1:]
    subcommand = [w for w in words if not w.startswith("-")][:1 if words[0] != "bench" else 2]
    if subcommand[0] == "bench" and len(subcommand) == 2:  # the benchmark's own usage, its status
        assert cli([*subcommand, "--help"]) == 0
    else:
        with pytest.raises(SystemExit) as stopped:
            cli([*subcommand, "--help"])
        assert stopped.value.code == 0
    assert "usage:" in capsys.readouterr().out


SMALL = {"doctor": ["--variants", "baseline", "--scales", "1", "--depth", "2", "--width", "16",
                    "--heads", "2", "--tokens", "8"],
         "diagram": ["--variants", "baseline", "--betas", "1", "--alphas", "0", "--depth", "2",
                     "--width", "16", "--heads", "2", "--tokens", "8"],
         "--model": ["--img-size", "32", "--batch", "2"]}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("command", _cli_commands())
def test_every_readme_cli_command_runs_small(command, tmp_path, capsys):
    words = command.split()[1:]
    if words[0] == "bench":  # the list of benchmarks, or NAME --help: the benchmark's usage
        assert cli(words) == 0
        printed = capsys.readouterr().out
        assert "usage:" in printed if "--help" in words else "speed: " in printed
        return
    if "--run" in words:  # doctor --run DIR: a small finished run to read
        run = tmp_path / "run"
        write_run(run, steps=8)
        words = [str(run) if word == "DIR" else word for word in words]
        assert cli([*words, "--out", str(tmp_path / "doctor.png")]) == 0
        assert (tmp_path / "doctor.png").exists()
        return
    extra = SMALL[words[0]] + (SMALL["--model"] if "--model" in words else [])
    assert cli([*words, *extra, "--out", str(tmp_path)]) == 0
    assert any(tmp_path.iterdir())


def _recipe_commands() -> list[str]:
    text = (ROOT / "recipes" / "README.md").read_text()
    return sorted(set(re.findall(r"(recipes/\w+\.py)", text)))


@pytest.mark.parametrize("script", _recipe_commands())
def test_every_recipe_command_of_recipes_readme_has_help(script):
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True,
                            text=True, timeout=120, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage:" in result.stdout

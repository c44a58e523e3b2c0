"""tools/render_readme.py: rendering every generated block from the committed results leaves
README.md as it is (each block is also checked by its benchmark's test), and it names a missing
block."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_rendering_the_committed_results_leaves_the_readme_unchanged(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "tools"))
    import render_readme

    readme = (ROOT / "README.md").read_text()
    assert render_readme.render(readme) == readme
    with pytest.raises(SystemExit, match="long-context"):
        render_readme.render(readme.replace("<!-- long-context: start -->", ""))
    assert sys.modules["render_readme"].BLOCKS.keys() >= {"speed-table", "sparse-table"}

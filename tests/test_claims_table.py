"""The claims table: reproducible to the byte, consistent with the claims under the 95 % rule, and
the README's copy generated from the committed results."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import claims_table
from robust_attn import list_variants
from robust_attn.claim import ENTROPY, HOLD_SHARE, RANK
from robust_attn.studies.claims import CLAIMS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def readme_block(name: str) -> str:
    """The README's text between ``<!-- name: start -->`` and ``<!-- name: end -->``."""
    block = re.search(rf"<!-- {name}: start -->\n(.*?)<!-- {name}: end -->",
                      (ROOT / "README.md").read_text(), re.S)
    assert block, f"README.md lacks the {name} markers"
    return block.group(1)


@pytest.fixture(scope="module")
def committed() -> dict:
    return json.loads((RESULTS / "claims.json").read_text())


def test_two_runs_write_identical_files(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    claims_table.measure.cache_clear()  # measure afresh: nothing carried over between the runs
    assert claims_table.main(["--quick", "--out", str(first)]) == 0
    claims_table.measure.cache_clear()
    assert claims_table.main(["--quick", "--out", str(second)]) == 0
    for name in ("claims.json", "claims.md"):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    report = json.loads((first / "claims.json").read_text())
    assert [row["variant"] for row in report["rows"]][0] == "baseline"
    assert sorted(row["variant"] for row in report["rows"]) == list_variants()
    assert report["setting"]["seeds"] >= 16


def test_the_committed_results_cover_every_preset_at_the_full_setting(committed):
    assert sorted(row["variant"] for row in committed["rows"]) == list_variants()
    assert committed["setting"] | {"columns": None, "after_training": None} == {
        **claims_table.FULL, "norm": "pre", "hold_share": HOLD_SHARE, "entropy_bound": 0.1,
        "rank_bound": 0.01, "columns": None, "after_training": None}


def test_after_training_columns_are_the_sweeps_health_file(committed):
    trained = json.loads(claims_table.TRAINED_HEALTH.read_text())
    assert committed["setting"]["after_training"]["config"] == trained["config"]
    for row in committed["rows"]:
        assert row["after_training"] == claims_table.after_training(trained, row["variant"])
    assert sum(row["after_training"] is not None for row in committed["rows"]) >= 8


def test_the_committed_results_state_the_current_claims(committed):
    """claims.json carries each claim's text and guarantees: regenerate it after editing claims."""
    for row in committed["rows"]:
        claim = CLAIMS[row["variant"]]
        assert (row["addresses"], row["source"], row["source_claim"], row["note"]) == (
            claim.addresses, claim.source, claim.source_claim, claim.note), row["variant"]
        assert [g["setting"] for g in row["guarantees"]] == [
            claims_table.describe_setting(g.setting) for g in claim.guarantees], row["variant"]


def test_claims_md_is_rendered_from_claims_json(committed):
    assert (RESULTS / "claims.md").read_text() == claims_table.markdown(committed)


def test_readme_table_is_rendered_from_claims_json(committed):
    assert readme_block("claims-table") == claims_table.claims_markdown(committed), (
        "README's claims table differs from benchmarks/results/claims.json: paste "
        "claims_table.claims_markdown(report) between the markers")


def test_readme_opening_lists_the_presets_by_what_they_avoid(committed):
    assert readme_block("presets-by-failure") == claims_table.addresses_markdown(committed)


def test_the_cell_verdicts_follow_the_95_percent_rule(committed):
    for row in committed["rows"]:
        for cell in row["measured"]:
            assert cell["verdict"] == claims_table.verdict(cell["entropy_kept"], cell["rank_kept"])


def test_no_preset_shows_a_failure_it_claims_to_address_where_the_baseline_shows_it(committed):
    """The claims rule on the table: where the baseline fails (on more than 5 % of seeds), a preset
    that addresses that failure avoids it on at least 95 % of them."""
    shows = {ENTROPY: ("entropy collapse", "both"), RANK: ("rank collapse", "both")}
    rows = {row["variant"]: row for row in committed["rows"]}
    checked = 0
    for variant, claim in CLAIMS.items():
        for failure in {guarantee.failure for guarantee in claim.guarantees}:
            for baseline, cell in zip(rows["baseline"]["measured"], rows[variant]["measured"],
                                      strict=True):
                if baseline["verdict"] in shows[failure]:
                    checked += 1
                    assert cell["verdict"] not in shows[failure], (variant, failure, cell)
    assert checked >= 8  # the baseline fails somewhere for every claimed failure


def test_the_both_collapse_preset_is_healthy_in_every_column(committed):
    robust = next(row for row in committed["rows"] if row["variant"] == "robust")
    assert robust["addresses"] == "both"
    assert [cell["verdict"] for cell in robust["measured"]] == ["healthy"] * 4

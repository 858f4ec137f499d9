"""Each benchmark suite runs end to end in ``--smoke`` mode (tiny sizes, one repeat), so the scripts do not rot.

Timings are never asserted: only that every suite writes its results (table, JSON, plots) with the expected rows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import run as bench  # noqa: E402

EXPECTED_METHODS = {
    "train": {"floor", "stock_proj", "stock_raw", "pp_proj", "pp_raw"},
    "decode": {"base", "stock", "pp_unmerged", "pp_merged"},
}


@pytest.mark.parametrize("suite", ["train", "decode", "size", "merge", "quality"])
def test_suite_runs_in_smoke_mode(suite: str, tmp_path: Path) -> None:
    assert bench.main(["--suite", suite, "--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    result = results["suites"][suite]
    assert result["rows"], "the suite produced no rows"
    markdown = (tmp_path / "results.md").read_text()
    assert f"## {suite}" in markdown
    for plot in result["plots"]:
        assert (tmp_path / plot).stat().st_size > 0
    if suite in EXPECTED_METHODS:
        assert {row["method"] for row in result["rows"]} == EXPECTED_METHODS[suite]
    if suite == "decode":  # merging the MLP must not change greedy outputs
        assert all(result["settings"]["merged_equals_unmerged_tokens"].values())
    if suite == "size":
        assert all(t["met"] for t in result["targets"]), result["targets"]
    if suite == "quality":
        assert {row["part"] for row in result["rows"]} == {"seq2seq", "smollm2"}


def test_results_accumulate_across_suites(tmp_path: Path) -> None:
    """Running suites one at a time into one folder keeps the earlier suites."""
    assert bench.main(["--suite", "size", "--smoke", "--out", str(tmp_path)]) == 0
    assert bench.main(["--suite", "merge", "--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["suites"]) == {"size", "merge"}

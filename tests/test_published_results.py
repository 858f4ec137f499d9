"""The main example's published figures (examples/README.md, "Results") are rendered from a run's summary.json."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "examples" / "report_results.py"


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("report_results", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_block_is_the_one_rendered_from_the_published_summary(report):
    summary = json.loads(report.PUBLISHED.read_text())
    text = report.README.read_text()
    assert report.replace_block(text, report.render(summary)) == text, (
        "examples/README.md's results are not those of examples/results/summary.json: run examples/report_results.py"
    )
    assert summary["run"]["beside"], "the published run must say what else ran"


def test_render_follows_the_summary_and_leaves_out_skipped_slot_coverage(report, tmp_path, capsys):
    summary = json.loads(report.PUBLISHED.read_text())
    changed = copy.deepcopy(summary)
    changed["after"]["bleu"] = 12.34
    changed["skipped_metrics"] = {"slot_coverage": "no example has `slots`"}
    block = report.render(changed)
    assert "| 12.3 |" in block and "slot coverage" not in block
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(summary))
    assert report.main([str(path), "--beside", "a test suite"]) == 0  # prints, writes nothing
    assert "| a test suite |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no <!-- results:start -->"):
        report.replace_block("no markers here", block)

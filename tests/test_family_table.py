"""The family tables of README.md and CONTRIBUTING.md are the ones the tests generate (`tests/family_table.py`)."""

from __future__ import annotations

import pytest
import transformers
from family_table import DOCUMENTS, END, GENERATED_WITH, START, render, replace_table
from packaging import version

pytestmark = pytest.mark.skipif(
    version.parse(transformers.__version__).release[:2] != version.parse(GENERATED_WITH).release[:2],
    reason=f"the committed tables list what transformers {GENERATED_WITH} supports (the newest supported version)",
)


def test_the_documents_hold_the_generated_family_table():
    table = render()
    for document in DOCUMENTS:
        text = document.read_text()
        assert replace_table(text, table) == text, (
            f"{document.name}'s family table is stale: run `python tests/family_table.py --write`"
        )


def test_the_table_lists_tested_and_refused_families():
    table = render()
    assert table.startswith(START) and table.endswith(END)
    for family, sites in [("t5", "encoder, self (decoder), cross"), ("llava", "self"), ("deepseek_v3", "self")]:
        assert any(line.startswith(f"| {family} |") and f"| {sites} |" in line for line in table.splitlines())
    assert "| deberta-v2 |" in table and "AttentionInterface" in table

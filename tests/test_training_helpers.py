"""Unit tests of the examples' training helpers, `examples/training_utils.py` (not part of the library)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from training_utils import check_output_dir, make_dataloader, resume_position  # noqa: E402


def test_resume_position_counts_the_short_last_step_of_an_epoch():
    assert resume_position(0, 10, 1) == (0, 0)
    assert resume_position(12, 10, 1) == (1, 2)
    # 5 batches, accumulation 2: steps of 2, 2 and 1 batches per epoch
    assert resume_position(3, 5, 2) == (1, 0)
    assert resume_position(4, 5, 2) == (1, 2)


def test_dataloader_order_is_seeded():
    first = [b.tolist() for b in make_dataloader(list(range(10)), 3, seed=4)]
    again = [b.tolist() for b in make_dataloader(list(range(10)), 3, seed=4)]
    other = [b.tolist() for b in make_dataloader(list(range(10)), 3, seed=5)]
    assert first == again != other
    assert sorted(sum(first, [])) == list(range(10))


def test_output_dir_guard(tmp_path):
    check_output_dir(tmp_path / "new", overwrite=False)
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        check_output_dir(tmp_path, overwrite=False)
    check_output_dir(tmp_path, overwrite=True)
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="--resume_from_checkpoint latest"):
        check_output_dir(unfinished, overwrite=False)
    check_output_dir(unfinished, overwrite=False, resuming=True)

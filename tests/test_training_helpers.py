"""Unit tests of the small Accelerate helper layer, `peft_prefix_plus.training`."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_model
from peft import get_peft_model

from peft_prefix_plus import PrefixPlusConfig
from peft_prefix_plus.training import (
    check_checkpoint_compatible,
    check_output_dir,
    list_checkpoints,
    make_dataloader,
    resolve_checkpoint,
    resume_position,
)


def test_latest_skips_partial_checkpoints(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        path = tmp_path / f"checkpoint-{step}"
        path.mkdir()
        if complete:
            (path / "training_state.json").write_text(json.dumps({"step": step}))
    (tmp_path / ".checkpoint-8.tmp").mkdir()  # a write interrupted by a kill
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-4"]
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-4"
    assert resolve_checkpoint(tmp_path, tmp_path / "checkpoint-2").name == "checkpoint-2"
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_checkpoint(tmp_path, tmp_path / "checkpoint-6")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path, tmp_path / "checkpoint-9")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "empty", "latest")


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


def test_checkpoint_config_check_lists_every_difference(tmp_path):
    base, task_type = tiny_model("llama")
    model = get_peft_model(base, PrefixPlusConfig(task_type=task_type, num_virtual_tokens=4, mlp_depth=2))
    config = model.peft_config["default"]
    config.save_pretrained(str(tmp_path))
    check_checkpoint_compatible(tmp_path, config)  # the same config passes
    other = PrefixPlusConfig(task_type=task_type, num_virtual_tokens=5, mlp_depth=1)
    other.site_shapes, other.token_dim = config.site_shapes, config.token_dim
    with pytest.raises(
        ValueError, match=r"num_virtual_tokens: checkpoint 4, now 5(.|\n)*mlp_depth: checkpoint 2, now 1"
    ):
        check_checkpoint_compatible(tmp_path, other)


def test_output_dir_guard(tmp_path):
    check_output_dir(tmp_path / "new", overwrite=False)
    (tmp_path / "summary.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--overwrite_output_dir"):
        check_output_dir(tmp_path, overwrite=False)
    check_output_dir(tmp_path, overwrite=True)

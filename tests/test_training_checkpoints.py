"""`peft_prefix_plus.checkpointing`: adapter-only, atomic, pickle-safe Accelerate checkpoints.

Kills are simulated by raising inside the operation (a patched `os.rename` or `shutil.rmtree`) and by leaving the
intermediate state on disk.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_model
from peft import get_peft_model
from safetensors.torch import load_file

from peft_prefix_plus import PrefixPlusConfig
from peft_prefix_plus.checkpointing import (
    CheckpointError,
    check_checkpoint_compatible,
    list_checkpoints,
    load_checkpoint,
    register_adapter_checkpointing,
    resolve_checkpoint,
    save_checkpoint,
)


class Counter:
    """A plain-data object given to `register_for_checkpointing` (Accelerate unpickles it with weights_only=False)."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


def make_run(tokens: dict[str, int] | None = None, seed: int = 0, name_or_path: str = "org/base", custom=False):
    """An accelerator with the adapter hook, a prepared PrefixPlus model (one adapter per entry), optimizer and
    scheduler; returns (accelerator, model, optimizer, counter)."""
    tokens = tokens or {"default": 3}
    base, task_type = tiny_model("llama")
    base.name_or_path = name_or_path
    torch.manual_seed(seed)
    names = list(tokens)
    config = lambda n: PrefixPlusConfig(task_type=task_type, num_virtual_tokens=n, mlp_hidden_size=8)  # noqa: E731
    model = get_peft_model(base, config(tokens[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, config(tokens[name]))
    accelerator = Accelerator(cpu=True)
    register_adapter_checkpointing(accelerator)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, total_iters=10)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    counter = Counter()
    if custom:
        accelerator.register_for_checkpointing(counter)
    return accelerator, model, optimizer, counter


def adapter_params(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if "prefix_plus_" in n}


def perturb(model, value: float) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "prefix_plus_" in name:
                param.add_(value)


def test_every_adapter_is_saved_with_its_own_config_and_restored(tmp_path):
    accelerator, model, _, _ = make_run({"default": 3, "other": 7})
    model.set_adapter("other")  # the active adapter is not "default": each config must still go with its weights
    path = save_checkpoint(accelerator, tmp_path, step=1)
    for folder, tokens in ((path, 3), (path / "other", 7)):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["num_virtual_tokens"] == tokens
        embeddings = [v for k, v in load_file(str(folder / "adapter_model.safetensors")).items() if "embedding" in k]
        assert embeddings and all(e.shape[0] == tokens for e in embeddings)
    files = set(json.loads((path / "training_state.json").read_text())["files"])
    assert {"scheduler.bin", "optimizer.bin", "random_states_0.pkl", "other/adapter_model.safetensors"} <= files
    assert not any(name.startswith(("custom_checkpoint", "model")) for name in files)  # no pickled custom state

    saved = adapter_params(model)
    accelerator, fresh, _, _ = make_run({"default": 3, "other": 7}, seed=1)
    assert any(not torch.equal(saved[n], p) for n, p in adapter_params(fresh).items())
    assert load_checkpoint(accelerator, path)["step"] == 1
    restored = adapter_params(fresh)
    assert saved.keys() == restored.keys() and all(torch.equal(saved[n], restored[n]) for n in saved)


def test_checkpoint_of_another_adapter_configuration_is_refused_naming_every_field(tmp_path):
    accelerator, _, _, _ = make_run({"default": 3})
    path = save_checkpoint(accelerator, tmp_path, step=1)
    accelerator, model, _, _ = make_run({"default": 5})
    with pytest.raises(
        CheckpointError, match=r"another adapter configuration(.|\n)*num_virtual_tokens: checkpoint 3, now 5"
    ):
        check_checkpoint_compatible(path, model)
    with pytest.raises(CheckpointError, match="num_virtual_tokens: checkpoint 3, now 5"):
        load_checkpoint(accelerator, path)
    with pytest.raises(CheckpointError, match="adapter 'other': no adapter_config.json"):
        check_checkpoint_compatible(path, make_run({"default": 3, "other": 2})[1])


def test_resuming_onto_another_base_model_with_the_same_shapes_warns(tmp_path):
    accelerator, _, _, _ = make_run(name_or_path="org/model-a")
    path = save_checkpoint(accelerator, tmp_path, step=1)
    accelerator, _, _, _ = make_run(name_or_path="org/model-b")
    with pytest.warns(UserWarning, match="trained on the base model 'org/model-a'.*being resumed is 'org/model-b'"):
        load_checkpoint(accelerator, path)


def evil_pickle(path: Path, marker: Path) -> None:
    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    torch.save({"state": Evil()}, path)


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl"])
def test_a_tampered_pickle_is_neither_run_nor_silently_ignored(tmp_path, name):
    accelerator, _, _, counter = make_run(custom=True)
    counter.count = 5
    path = save_checkpoint(accelerator, tmp_path / "checkpoints", step=1)
    assert (path / name).is_file()
    marker = tmp_path / "pwned"
    evil_pickle(path / name, marker)
    accelerator, _, _, counter = make_run(custom=True)
    with pytest.raises(CheckpointError, match=rf"{name} cannot be loaded safely.*was not unpickled"):
        load_checkpoint(accelerator, path)
    assert not marker.exists() and counter.count == 0


def test_a_planted_pickle_that_no_save_writes_is_refused(tmp_path):
    accelerator, _, _, _ = make_run()
    path = save_checkpoint(accelerator, tmp_path / "checkpoints", step=1)
    marker = tmp_path / "pwned"
    evil_pickle(path / "custom_checkpoint_0.pkl", marker)
    with pytest.raises(CheckpointError, match="custom_checkpoint_0.pkl cannot be loaded safely"):
        load_checkpoint(make_run()[0], path)
    assert not marker.exists()


def test_saving_an_existing_step_keeps_the_old_checkpoint_if_the_replacement_is_interrupted(tmp_path, monkeypatch):
    accelerator, model, _, _ = make_run()
    first = adapter_params(model)
    path = save_checkpoint(accelerator, tmp_path, step=1, extra_state={"run": "first"})
    perturb(model, 1.0)

    def killed_at_the_rename(real):
        def call(src, dst, *args, **kwargs):
            if Path(dst) == path and str(src).endswith(".tmp"):  # the new checkpoint moving into place
                raise OSError("simulated kill")
            return real(src, dst, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "rename", killed_at_the_rename(os.rename))
    monkeypatch.setattr(os, "replace", killed_at_the_rename(os.replace))
    with pytest.raises(OSError, match="simulated kill"):
        save_checkpoint(accelerator, tmp_path, step=1, extra_state={"run": "second"})
    monkeypatch.undo()
    assert list_checkpoints(tmp_path) == [path]
    assert json.loads((path / "training_state.json").read_text())["run"] == "first"
    accelerator, fresh, _, _ = make_run(seed=1)
    load_checkpoint(accelerator, path)
    assert all(torch.equal(first[n], p) for n, p in adapter_params(fresh).items())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoints.json"]  # nothing stray


def test_latest_is_the_most_recent_save_after_a_rollback(tmp_path):
    accelerator, _, _, _ = make_run()
    for step in (13, 14, 15):
        save_checkpoint(accelerator, tmp_path, step=step, extra_state={"run": "abandoned"})
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-15"
    accelerator, _, _, _ = make_run()
    load_checkpoint(accelerator, tmp_path / "checkpoint-13")  # roll back, then train on
    save_checkpoint(accelerator, tmp_path, step=14, extra_state={"run": "new"})
    latest = resolve_checkpoint(tmp_path, "latest")
    assert latest.name == "checkpoint-14"
    assert json.loads((latest / "training_state.json").read_text())["run"] == "new"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-13", "checkpoint-15", "checkpoint-14"]
    record = json.loads((tmp_path / "checkpoints.json").read_text())
    assert record["latest"] == "checkpoint-14"
    # total_limit keeps the most recent saves: the abandoned checkpoint-15 goes before the new work
    save_checkpoint(accelerator, tmp_path, step=16, extra_state={"run": "new"}, total_limit=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-14", "checkpoint-16"]


def test_interrupted_pruning_leaves_no_listed_half_deleted_checkpoint(tmp_path, monkeypatch):
    accelerator, _, _, _ = make_run()
    save_checkpoint(accelerator, tmp_path, step=1)
    save_checkpoint(accelerator, tmp_path, step=2)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):  # deletes one file of the checkpoint, then the process "dies"
        if "checkpoint-1" in str(path):
            os.remove(Path(path) / "optimizer.bin")
            raise KeyboardInterrupt("simulated kill")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(accelerator, tmp_path, step=3, total_limit=2)
    monkeypatch.undo()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-3"
    assert not (tmp_path / "checkpoint-1").exists()  # renamed out of the listed set before the deletion began
    (tmp_path / ".checkpoints.json.x1y2.tmp").write_text('{"lat')  # a kill while the record was written
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-3"
    save_checkpoint(accelerator, tmp_path, step=4, total_limit=2)  # the next save clears what the kills left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4", "checkpoints.json"]


def test_a_half_deleted_checkpoint_is_not_listed_and_resuming_it_is_a_clear_error(tmp_path):
    accelerator, _, _, _ = make_run()
    save_checkpoint(accelerator, tmp_path, step=1)
    broken = save_checkpoint(accelerator, tmp_path, step=2)
    (broken / "optimizer.bin").unlink()  # what a kill during a plain rmtree leaves: training_state.json is still there
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1"]
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-1"
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint \(missing optimizer.bin\).*checkpoint-1"):
        resolve_checkpoint(tmp_path, broken)
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint \(missing optimizer.bin\)"):
        load_checkpoint(make_run()[0], broken)


def test_a_step_saved_again_is_replaced_even_without_a_default_adapter(tmp_path):
    """A checkpoint is recognised by its training state, not by an adapter at its root."""
    accelerator, _, _, _ = make_run({"sft": 3})  # no "default" adapter: no adapter_config.json at the root
    path = save_checkpoint(accelerator, tmp_path, step=1, extra_state={"run": "first"})
    assert save_checkpoint(accelerator, tmp_path, step=1, extra_state={"run": "second"}) == path
    assert list_checkpoints(tmp_path) == [path]
    assert json.loads((path / "training_state.json").read_text())["run"] == "second"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1", "checkpoints.json"], "a backup was left"

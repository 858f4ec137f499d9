"""Running the main example, `examples/train_data_to_text.py`, from the tests: one smoke run shared by the modules.

`smoke_run` trains 2 steps on a tiny model (saved with a tokenizer by `tests/scripts/make_tiny_model.py`), keeps
its checkpoints and pushes its adapter to a local Hub stand-in; the run is made once per test session and reused by
`tests/test_training_example.py` and `tests/test_readme.py`.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"
EXAMPLE = EXAMPLES / "train_data_to_text.py"
SCRIPTS = Path(__file__).resolve().parent / "scripts"
#: The example's smoke configuration: small evaluation, generation and batches; a step is logged every step.
FAST = [
    "--max_eval_samples",
    "6",
    "--untuned_eval_samples",
    "4",
    "--max_new_tokens",
    "6",
    "--eval_batch_size",
    "2",
    "--batch_size",
    "4",
    "--logging_steps",
    "1",
]
HUB_REPO = "user/tiny-data-to-text"

for path in (EXAMPLES, SCRIPTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))


def load_example_module():
    """examples/train_data_to_text.py as a module (its functions, without running it)."""
    spec = importlib.util.spec_from_file_location("train_data_to_text", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def example_env(**extra: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **extra}
    if "HF_ENDPOINT" in extra:
        env.pop("HF_HUB_OFFLINE")
    return env


def run_example(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run the example in a subprocess; with `check`, fail showing its output if it exits non-zero."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), *args],
        env=example_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"example failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with a tokenizer, saved once per session."""
    from make_tiny_model import make_tiny_model

    target = tmp_path_factory.getbasetemp() / "models" / "tiny-llama"
    if not (target / "config.json").is_file():
        make_tiny_model(target, "llama")
    return target


def smoke_run(tmp_path_factory) -> dict:
    """The example's smoke run (2 steps, a checkpoint at step 1 kept, pushed to a local Hub), made once per session.

    Returns:
        `dict`: `out` (the output directory), `model` (the tiny model's directory), `stdout`, `stderr`, and `pushed`
        (the adapter_config.json and README.md the Hub received).
    """
    from hub_server import TOKEN, HubServer

    base = tmp_path_factory.getbasetemp() / "example-smoke"
    record = base / "run.json"
    if record.is_file():
        return {**json.loads(record.read_text()), "out": base / "out"}
    model = tiny_model_dir(tmp_path_factory)
    out = base / "out"
    home = base / "hf_home"
    with HubServer() as server:
        env = {"HF_ENDPOINT": server.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(home)}
        result = run_example(
            "--model",
            str(model),
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--checkpointing_steps",
            "1",
            "--keep_checkpoints",
            "--push_to_hub",
            HUB_REPO,
            *FAST,
            env=env,
        )
        pushed = {name: server.file(HUB_REPO, name).decode() for name in ("adapter_config.json", "README.md")}
    run = {"model": str(model), "stdout": result.stdout, "stderr": result.stderr, "pushed": pushed}
    record.write_text(json.dumps(run))
    return {**run, "out": out}

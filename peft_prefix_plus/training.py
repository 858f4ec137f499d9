"""A small helper layer for training PrefixPlus adapters with Accelerate.

It adds what a training script needs around `accelerate` and keeps everything else to the libraries:

- [`make_dataloader`]: a seeded, shuffled dataloader whose order does not depend on the number of processes, so a
  run can be resumed exactly (Accelerate shards it across ranks in `prepare`).
- [`register_adapter_checkpointing`]: makes `accelerator.save_state` / `load_state` store the adapter only (its
  MLP, not the frozen base model), in PEFT's format.
- [`save_checkpoint`]: an atomic `accelerator.save_state` into `checkpoint-<step>`, so that a run killed while
  writing leaves the last complete checkpoint intact; [`resolve_checkpoint`] finds `"latest"`;
  [`check_checkpoint_compatible`] refuses a checkpoint of another adapter configuration before training starts;
  [`load_checkpoint`] restores it and returns the step.
- [`gather_sum`], [`plot_loss`], [`check_output_dir`].

Example:

```py
>>> accelerator = Accelerator(gradient_accumulation_steps=2)
>>> register_adapter_checkpointing(accelerator)
>>> model, optimizer, loader = accelerator.prepare(model, optimizer, make_dataloader(rows, 8, collate, seed=0))
>>> save_checkpoint(accelerator, "out/checkpoints", step=100, config=model_config)
>>> step = load_checkpoint(accelerator, resolve_checkpoint("out/checkpoints", "latest"))
```
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from accelerate import Accelerator
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from .config import PrefixPlusConfig

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "training_state.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
#: Fields of a PrefixPlusConfig that decide the shape of the trained parameters: a checkpoint must match them.
SHAPE_FIELDS = (
    "task_type",
    "num_virtual_tokens",
    "encoder_num_virtual_tokens",
    "cross_num_virtual_tokens",
    "prefix_projection",
    "mlp_hidden_size",
    "mlp_depth",
    "mlp_activation",
    "layers_to_transform",
    "offset_position_ids",
    "site_shapes",
    "token_dim",
)
#: The name of the file that marks a finished run in an output directory.
SUMMARY_FILE = "summary.json"


def make_dataloader(
    dataset: Sequence,
    batch_size: int,
    collate_fn: Optional[Callable] = None,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
) -> DataLoader:
    """A dataloader with a seeded shuffle whose order is the same whatever the number of processes.

    Pass it to `accelerator.prepare`, which shards it across processes: with `n` processes each optimizer step sees
    the same `n * batch_size` examples a single process sees with batch size `n * batch_size`. With an
    `Accelerator(dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))` the shuffle depends only on
    `seed` and the epoch (`loader.set_epoch(epoch)`), which is what makes an exact resume possible.

    Args:
        dataset (`Sequence`): The examples.
        batch_size (`int`): Batch size per process.
        collate_fn (`Callable`, *optional*): Builds a batch from a list of examples.
        shuffle (`bool`): Shuffle every epoch.
        seed (`int`): Seed of the shuffle.
        drop_last (`bool`): Drop the last incomplete batch.

    Example:

    ```py
    >>> loader = make_dataloader(rows, batch_size=8, collate_fn=collate, seed=42)
    ```
    """
    if shuffle:
        generator = torch.Generator().manual_seed(seed)
        sampler = RandomSampler(dataset, generator=generator)
    else:
        sampler = SequentialSampler(dataset)
    # the loader's own generator: creating an iterator then draws no number from the global RNG, so a resumed run
    # (which creates its iterator after restoring the RNG state) sees the same dropout masks as an uninterrupted one
    loader_generator = torch.Generator().manual_seed(seed + 1)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        drop_last=drop_last,
        generator=loader_generator,
    )


# ---------------------------------------------------------------------------------------------------------- checkpoints
def register_adapter_checkpointing(accelerator: Accelerator) -> None:
    """Make `accelerator.save_state` / `load_state` save and restore only the adapters of prepared PEFT models.

    Without this, Accelerate writes the whole state dict, frozen base model included, in every checkpoint (over half a
    gigabyte for a 135M-parameter model). With it, every prepared [`~peft.PeftModel`] is written in PEFT's format
    (`adapter_model.safetensors`, its MLP included, and `adapter_config.json`; a second model goes to
    `model_1/`...); optimizer, scheduler, sampler and RNG states are still written by Accelerate. Other models are
    left to Accelerate.

    Args:
        accelerator (`Accelerator`): The accelerator whose checkpoints should hold adapters only.

    Example:

    ```py
    >>> accelerator = Accelerator()
    >>> register_adapter_checkpointing(accelerator)
    ```
    """

    def save_hook(models: list[torch.nn.Module], weights: list[dict], output_dir: str) -> None:
        for index in reversed(range(len(models))):
            model = accelerator.unwrap_model(models[index])
            if not isinstance(model, PeftModel):
                continue
            if accelerator.is_main_process:
                target = Path(output_dir) / (f"model_{index}" if index else "")
                target.mkdir(parents=True, exist_ok=True)
                state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
                save_file(state, str(target / ADAPTER_WEIGHTS), metadata={"format": "pt"})
                model.peft_config[model.active_adapter].save_pretrained(str(target))
            if weights:
                weights.pop(index)

    def load_hook(models: list[torch.nn.Module], input_dir: str) -> None:
        for index in reversed(range(len(models))):
            model = accelerator.unwrap_model(models[index])
            if not isinstance(model, PeftModel):
                continue
            source = Path(input_dir) / (f"model_{index}" if index else "") / ADAPTER_WEIGHTS
            if not source.is_file():
                raise FileNotFoundError(f"{source} is missing: {input_dir} holds no adapter for model {index}.")
            result = set_peft_model_state_dict(model, load_file(str(source)))
            missing = [key for key in result.missing_keys if "prefix_plus_" in key]
            if missing:
                raise ValueError(f"The checkpoint {input_dir} lacks adapter weights: {missing[:5]}")
            models.pop(index)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _step_of(path: Path) -> Optional[int]:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match else None


def list_checkpoints(checkpoint_root: Union[str, Path]) -> list[Path]:
    """The complete checkpoints in `checkpoint_root`, oldest first (partly written ones are not listed).

    Args:
        checkpoint_root (`str` or `Path`): The directory holding `checkpoint-<step>` directories.
    """
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _step_of(p) is not None and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


def resolve_checkpoint(checkpoint_root: Union[str, Path], spec: Union[str, Path]) -> Path:
    """Turn `--resume_from_checkpoint` into a checkpoint directory.

    Args:
        checkpoint_root (`str` or `Path`): Where the run writes its checkpoints (used for `"latest"`).
        spec (`str` or `Path`): `"latest"` for the newest complete checkpoint in `checkpoint_root`, or the path of a
            checkpoint directory.

    Raises:
        FileNotFoundError: If there is no such (complete) checkpoint.

    Example:

    ```py
    >>> resolve_checkpoint("out/checkpoints", "latest")
    PosixPath('out/checkpoints/checkpoint-300')
    ```
    """
    if str(spec) == "latest":
        found = list_checkpoints(checkpoint_root)
        if not found:
            raise FileNotFoundError(
                f"--resume_from_checkpoint latest: no complete checkpoint in {checkpoint_root}. Start without "
                "--resume_from_checkpoint, or give the path of a checkpoint directory."
            )
        return found[-1]
    path = Path(spec)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint: {path} does not exist or is not a directory.")
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"--resume_from_checkpoint: {path} is not a complete checkpoint (no {STATE_FILE}); it may have been "
            "written by an interrupted run. Use an earlier checkpoint or 'latest'."
        )
    return path


def check_checkpoint_compatible(checkpoint: Union[str, Path], config: PrefixPlusConfig) -> None:
    """Refuse a checkpoint whose adapter differs in shape from `config`, before any training starts.

    Args:
        checkpoint (`str` or `Path`): A checkpoint directory written by [`save_checkpoint`].
        config ([`PrefixPlusConfig`]): The configuration of the adapter about to be trained (after
            `get_peft_model`, so that `site_shapes` and `token_dim` are filled in).

    Raises:
        ValueError: Listing every differing field.

    Example:

    ```py
    >>> check_checkpoint_compatible("out/checkpoints/checkpoint-100", model.peft_config["default"])
    ```
    """
    path = Path(checkpoint) / ADAPTER_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{checkpoint} holds no {ADAPTER_CONFIG}; it is not a PrefixPlus training checkpoint.")
    saved = json.loads(path.read_text())
    current = json.loads(json.dumps(config.to_dict(), default=str))
    diffs = [
        f"{name}: checkpoint {saved.get(name)!r}, now {current.get(name)!r}"
        for name in SHAPE_FIELDS
        if saved.get(name) != current.get(name)
    ]
    if saved.get("peft_type") != current.get("peft_type"):
        diffs.insert(0, f"peft_type: checkpoint {saved.get('peft_type')!r}, now {current.get('peft_type')!r}")
    if diffs:
        raise ValueError(
            f"The checkpoint {checkpoint} was trained with another adapter configuration; use the same options as "
            "the run that wrote it:\n  " + "\n  ".join(diffs)
        )


def save_checkpoint(
    accelerator: Accelerator,
    checkpoint_root: Union[str, Path],
    step: int,
    extra_state: Optional[dict[str, Any]] = None,
    total_limit: Optional[int] = None,
) -> Path:
    """`accelerator.save_state` into `checkpoint_root/checkpoint-<step>`, atomically. Call it on every process.

    The state is first written to a hidden temporary directory; only once every process has finished does the main
    process write `training_state.json` and rename the directory into place. A run killed at any point therefore
    leaves either no trace of this checkpoint or a complete one, and the previous checkpoints untouched.

    Args:
        accelerator (`Accelerator`): The accelerator (with [`register_adapter_checkpointing`] for adapter-only
            checkpoints).
        checkpoint_root (`str` or `Path`): Directory of the checkpoints.
        step (`int`): The optimizer step reached.
        extra_state (`dict`, *optional*): Stored in `training_state.json` with the step (e.g. the loss history).
        total_limit (`int`, *optional*): Keep at most this many checkpoints, deleting the oldest.

    Returns:
        `Path`: The checkpoint directory.

    Example:

    ```py
    >>> save_checkpoint(accelerator, "out/checkpoints", step=100, extra_state={"losses": losses}, total_limit=2)
    ```
    """
    root = Path(checkpoint_root)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    tmp = root / f".{CHECKPOINT_PREFIX}{step}.tmp"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"step": step, "num_processes": accelerator.num_processes, **(extra_state or {})}
        with open(tmp / STATE_FILE, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit is not None:
            for old in list_checkpoints(root)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, checkpoint: Union[str, Path]) -> dict[str, Any]:
    """Restore a checkpoint written by [`save_checkpoint`] (adapter, optimizer, scheduler, samplers, RNG states).

    Args:
        accelerator (`Accelerator`): The accelerator, with model, optimizer and scheduler already prepared.
        checkpoint (`str` or `Path`): The checkpoint directory (see [`resolve_checkpoint`]).

    Returns:
        `dict`: The contents of `training_state.json`; `"step"` is the optimizer step to continue from.

    Example:

    ```py
    >>> state = load_checkpoint(accelerator, "out/checkpoints/checkpoint-100")
    >>> state["step"]
    100
    ```
    """
    accelerator.load_state(str(checkpoint))
    return json.loads((Path(checkpoint) / STATE_FILE).read_text())


def resume_position(step: int, batches_per_epoch: int, gradient_accumulation_steps: int = 1) -> tuple[int, int]:
    """Where an optimizer step falls in the data: `(epoch, batches to skip in that epoch)`.

    Args:
        step (`int`): Completed optimizer steps.
        batches_per_epoch (`int`): Batches per epoch on each process (`len(prepared_loader)`).
        gradient_accumulation_steps (`int`): Batches per optimizer step.

    Example:

    ```py
    >>> epoch, skip = resume_position(150, len(loader), 2)
    >>> loader.set_epoch(epoch)
    >>> batches = accelerator.skip_first_batches(loader, skip)
    ```
    """
    # Accelerate also steps at the end of an epoch whose batch count is not a multiple of the accumulation
    steps_per_epoch = max(math.ceil(batches_per_epoch / gradient_accumulation_steps), 1)
    epoch, within = divmod(step, steps_per_epoch)
    return epoch, within * gradient_accumulation_steps


# ---------------------------------------------------------------------------------------------------------- metrics etc.
def gather_sum(accelerator: Accelerator, value: Union[float, torch.Tensor]) -> float:
    """Sum a number over all processes.

    Args:
        accelerator (`Accelerator`): The accelerator.
        value (`float` or `torch.Tensor`): This process's share.

    Example:

    ```py
    >>> total_tokens = gather_sum(accelerator, local_tokens)
    ```
    """
    tensor = torch.as_tensor(value, dtype=torch.float64, device=accelerator.device).reshape(1)
    return float(accelerator.reduce(tensor, reduction="sum").item())


def check_output_dir(output_dir: Union[str, Path], overwrite: bool, resuming: bool = False) -> None:
    """Refuse to overwrite a finished run (one with `summary.json`) unless `overwrite` is set.

    Args:
        output_dir (`str` or `Path`): The run's output directory.
        overwrite (`bool`): `--overwrite_output_dir`: remove the finished run's outputs and start again.
        resuming (`bool`): Whether the run resumes from a checkpoint (an unfinished run may be continued).

    Raises:
        FileExistsError: If `output_dir` holds a finished run and `overwrite` is not set.
    """
    path = Path(output_dir)
    if (path / SUMMARY_FILE).is_file() and not overwrite:
        raise FileExistsError(
            f"{path} already holds a finished run ({SUMMARY_FILE}). Pass --overwrite_output_dir to replace it, or "
            "choose another --output_dir."
        )
    if not resuming and not overwrite and any((path / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*")):
        raise FileExistsError(
            f"{path} holds checkpoints of an unfinished run. Pass --resume_from_checkpoint latest to continue it, "
            "or --overwrite_output_dir to start again."
        )


def plot_loss(steps: Sequence[int], losses: Sequence[float], path: Union[str, Path], title: str = "") -> None:
    """Draw the training loss curve with matplotlib (Agg backend) and save it to `path`.

    Args:
        steps (`Sequence[int]`): Optimizer steps.
        losses (`Sequence[float]`): Training loss at those steps.
        path (`str` or `Path`): Image file to write, e.g. `loss.png`.
        title (`str`): Title of the plot.

    Example:

    ```py
    >>> plot_loss([10, 20], [2.1, 1.4], "out/loss.png")
    ```
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(list(steps), list(losses), marker="." if len(steps) < 50 else None)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)

"""Adapter-only, atomic training checkpoints with Accelerate.

- [`register_adapter_checkpointing`]: `accelerator.save_state` / `load_state` store every adapter of a prepared
  [`~peft.PeftModel`] with PEFT's own `save_pretrained` / `load_peft_weights` (each adapter with its own config; the
  frozen base model is not written), instead of the whole state dict.
- [`save_checkpoint`]: `accelerator.save_state` into `checkpoint-<step>`, written atomically by the package's one
  directory writer, with a manifest of every file the save wrote. The checkpoint root records the saves in the order
  they completed (`checkpoints.json`), so `"latest"` is the most recent save, also after a rollback; `total_limit`
  prunes the oldest saves by first renaming them out of the listed set, then deleting them.
- [`list_checkpoints`], [`resolve_checkpoint`]: only complete checkpoints (every file of the manifest present).
- [`load_checkpoint`]: refuses an incomplete checkpoint, one of another adapter configuration, and any pickled file
  that torch's `weights_only` unpickler refuses (a tampered file is never run, and never silently skipped), then
  restores it with `accelerator.load_state`.

Example:

```py
>>> accelerator = Accelerator()
>>> register_adapter_checkpointing(accelerator)
>>> model, optimizer, scheduler, loader = accelerator.prepare(model, optimizer, scheduler, loader)
>>> save_checkpoint(accelerator, "out/checkpoints", step=100, total_limit=2)
>>> state = load_checkpoint(accelerator, resolve_checkpoint("out/checkpoints", "latest"))
```
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from accelerate.utils import load as accelerate_load
from peft import PeftConfig, PeftModel, load_peft_weights, set_peft_model_state_dict
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from .files.write import atomic_directory, atomic_file  # the package's one atomic writer

PathLike = Union[str, os.PathLike]

CHECKPOINT_PREFIX = "checkpoint-"
#: Written last into every checkpoint: the step, the caller's extra state and the manifest (`"files"`).
STATE_FILE = "training_state.json"
#: In the checkpoint root: the checkpoints in the order their saves completed; the last one is `"latest"`.
RECORD_FILE = "checkpoints.json"
#: Files that hold no pickle: everything else in a checkpoint is checked with torch's `weights_only` unpickler.
_NOT_PICKLED = (".json", ".safetensors", ".md")
#: Fields of an adapter config that decide the shapes (or the meaning) of the trained parameters.
SHAPE_FIELDS = (
    "peft_type",
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


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed: incomplete, of another adapter configuration, or holding unsafe files."""


# ---------------------------------------------------------------------------------------------------------- the hook
def _adapter_dirs(model: PeftModel, directory: Path) -> dict[str, Path]:
    """Where `save_pretrained` puts each adapter: "default" at the top, the others in a folder of their name."""
    return {name: directory if name == "default" else directory / name for name in model.peft_config}


def _json_ready(config: PeftConfig) -> dict[str, Any]:
    return json.loads(json.dumps(config.to_dict(), default=str))


def check_checkpoint_compatible(checkpoint: PathLike, model: Union[PeftModel, PeftConfig]) -> None:
    """Refuse a checkpoint whose adapters differ in shape from the model's, before anything is loaded.

    Args:
        checkpoint (`str` or `os.PathLike`): A checkpoint written by [`save_checkpoint`] (or the folder of one model
            inside it).
        model ([`~peft.PeftModel`] or [`~peft.PeftConfig`]): The model about to be trained (every adapter is
            compared), or the config of its "default" adapter.

    Raises:
        CheckpointError: Naming every differing field of every adapter, or a missing adapter.

    Example:

    ```py
    >>> check_checkpoint_compatible("out/checkpoints/checkpoint-100", peft_model)
    ```
    """
    directory = Path(checkpoint)
    configs = model.peft_config if isinstance(model, PeftModel) else {"default": model}
    problems = []
    for name, config in configs.items():
        path = (directory if name == "default" else directory / name) / CONFIG_NAME
        if not path.is_file():
            problems.append(f"adapter {name!r}: no {CONFIG_NAME} in {path.parent}")
            continue
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            problems.append(f"adapter {name!r}: {path} is unreadable ({error})")
            continue
        current = _json_ready(config)
        for field in SHAPE_FIELDS:
            if saved.get(field) != current.get(field):
                prefix = "" if len(configs) == 1 else f"adapter {name!r}, "
                problems.append(f"{prefix}{field}: checkpoint {saved.get(field)!r}, now {current.get(field)!r}")
    if problems:
        raise CheckpointError(
            f"The checkpoint {checkpoint} was trained with another adapter configuration; use the same options as "
            "the run that wrote it:\n  " + "\n  ".join(problems)
        )


def _warn_if_other_base_model(directory: Path, name: str, config: PeftConfig) -> None:
    saved = json.loads((directory / CONFIG_NAME).read_text(encoding="utf-8")).get("base_model_name_or_path")
    now = config.base_model_name_or_path
    if saved and now and saved != now:
        warnings.warn(
            f"The checkpoint {directory} (adapter {name!r}) was trained on the base model {saved!r}, but the model "
            f"being resumed is {now!r}. The shapes match, so it loads, but an adapter trained on one model gives "
            "poor results on another: resume with the base model the checkpoint was trained on.",
            UserWarning,
            stacklevel=3,
        )


def load_adapters(model: PeftModel, directory: PathLike, warn_base_model: bool = True) -> None:
    """Load into `model` every one of its adapters from `directory`, as [`register_adapter_checkpointing`] saved them.

    Args:
        model ([`~peft.PeftModel`]): The (unwrapped) model whose adapters to restore.
        directory (`str` or `os.PathLike`): A folder written by `model.save_pretrained` ("default" at the top, other
            adapters in a folder of their name).
        warn_base_model (`bool`): Warn if an adapter was saved from a model with another `base_model_name_or_path`.

    Raises:
        CheckpointError: If an adapter is missing, of another configuration, or lacks weights.

    Example:

    ```py
    >>> load_adapters(peft_model, "out/checkpoints/checkpoint-100")
    ```
    """
    directory = Path(directory)
    check_checkpoint_compatible(directory, model)
    for name, adapter_dir in _adapter_dirs(model, directory).items():
        if not (adapter_dir / SAFETENSORS_WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{adapter_dir} holds no {SAFETENSORS_WEIGHTS_NAME} for adapter {name!r}.")
        if warn_base_model:
            _warn_if_other_base_model(adapter_dir, name, model.peft_config[name])
        weights = load_peft_weights(str(adapter_dir), device="cpu")
        result = set_peft_model_state_dict(model, weights, adapter_name=name)
        missing = [key for key in result.missing_keys if "prefix_plus_" in key and name in key.split(".")]
        if missing:
            raise CheckpointError(f"The checkpoint {adapter_dir} lacks weights of adapter {name!r}: {missing[:5]}")


def register_adapter_checkpointing(accelerator: Accelerator) -> None:
    """Make `accelerator.save_state` / `load_state` save and restore only the adapters of prepared PEFT models.

    Without this, Accelerate writes the whole state dict, frozen base model included, in every checkpoint (over half a
    gigabyte for a 135M-parameter model). With it, every prepared [`~peft.PeftModel`] is written with its own
    `save_pretrained`: every adapter with its own `adapter_config.json` ("default" at the top of the checkpoint, the
    others in a folder of their name; a second model goes to `model_1/`), the MLP included. `load_state` restores them
    with `load_peft_weights`, after checking each config against the model's, and warns when the checkpoint was
    trained on another base model (`base_model_name_or_path`). Optimizer, scheduler and RNG states are still written by
    Accelerate; other models are left to it.

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
            target = Path(output_dir) / (f"model_{index}" if index else "")
            # no embedding-layer check: it looks the base model up on the Hub, and a PrefixPlus adapter trains none
            model.save_pretrained(
                str(target), is_main_process=accelerator.is_main_process, save_embedding_layers=False
            )
            if weights:
                weights.pop(index)

    def load_hook(models: list[torch.nn.Module], input_dir: str) -> None:
        for index in reversed(range(len(models))):
            model = accelerator.unwrap_model(models[index])
            if not isinstance(model, PeftModel):
                continue
            directory = Path(input_dir) / (f"model_{index}" if index else "")
            load_adapters(model, directory, warn_base_model=accelerator.is_main_process)
            models.pop(index)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ---------------------------------------------------------------------------------------------------------- the files
def _step_of(path: Path) -> Optional[int]:
    match = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", path.name)
    return int(match.group(1)) if match else None


def checkpoint_problems(checkpoint: PathLike) -> list[str]:
    """What keeps `checkpoint` from being complete: an empty list for a complete one.

    A checkpoint is complete when its `training_state.json` (written last) is readable and every file of its manifest
    (every file the save wrote) is present.

    Example:

    ```py
    >>> checkpoint_problems("out/checkpoints/checkpoint-100")
    []
    ```
    """
    path = Path(checkpoint)
    if not path.is_dir():
        return [f"{path} does not exist or is not a directory"]
    try:
        state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return [f"no {STATE_FILE}"]
    except (OSError, ValueError) as error:
        return [f"{STATE_FILE} is unreadable ({error})"]
    if (
        not isinstance(state, dict)
        or not isinstance(state.get("step"), int)
        or not isinstance(state.get("files"), list)
    ):
        return [f"{STATE_FILE} has no step or file list (not written by save_checkpoint)"]
    missing = [name for name in state["files"] if not (path / name).is_file()]
    return [f"missing {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"] if missing else []


def _read_record(root: Path) -> list[str]:
    try:
        record = json.loads((root / RECORD_FILE).read_text(encoding="utf-8"))
        return [name for name in record.get("saved", []) if isinstance(name, str)]
    except (OSError, ValueError, AttributeError):
        return []


def _write_record(root: Path, saved: list[str]) -> None:
    """Write the record of saves atomically, with the package's one file writer."""
    data = json.dumps({"latest": saved[-1] if saved else None, "saved": saved}, indent=2)
    with atomic_file(root / RECORD_FILE) as tmp:
        tmp.write_text(data, encoding="utf-8")


def list_checkpoints(checkpoint_root: PathLike) -> list[Path]:
    """The complete checkpoints in `checkpoint_root`, in the order their saves completed (the last is `"latest"`).

    Incomplete checkpoints (a save or a deletion that was interrupted) are not listed. A save counts as done once the
    root's record (`checkpoints.json`) names it; complete checkpoints it does not name (a save killed between its
    rename and its record, or copied in by hand) come first, by step, so `"latest"` never picks one over a recorded
    save.

    Args:
        checkpoint_root (`str` or `os.PathLike`): The directory holding `checkpoint-<step>` directories.

    Example:

    ```py
    >>> list_checkpoints("out/checkpoints")
    [PosixPath('out/checkpoints/checkpoint-200'), PosixPath('out/checkpoints/checkpoint-300')]
    ```
    """
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    complete = {p.name: p for p in root.iterdir() if _step_of(p) is not None and not checkpoint_problems(p)}
    recorded = [name for name in _read_record(root) if name in complete]
    others = sorted((name for name in complete if name not in recorded), key=lambda n: _step_of(complete[n]))
    return [complete[name] for name in others + recorded]


def resolve_checkpoint(checkpoint_root: PathLike, spec: PathLike) -> Path:
    """Turn `--resume_from_checkpoint` into a complete checkpoint directory.

    Args:
        checkpoint_root (`str` or `os.PathLike`): Where the run writes its checkpoints (used for `"latest"`).
        spec (`str` or `os.PathLike`): `"latest"` for the most recently saved complete checkpoint in
            `checkpoint_root`, or the path of a checkpoint directory.

    Raises:
        FileNotFoundError: If there is no such checkpoint.
        CheckpointError: If the given checkpoint is incomplete.

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
    problems = checkpoint_problems(path)
    if problems:
        available = [p.name for p in list_checkpoints(path.parent)]
        raise CheckpointError(
            f"--resume_from_checkpoint: {path} is not a complete checkpoint ({'; '.join(problems)}); a save or a "
            "deletion of it was interrupted. Resume from another one"
            + (f" ({', '.join(available)}) or 'latest'." if available else ".")
        )
    return path


def _remove(path: Path, trash_name: str) -> None:
    """Rename `path` out of the listed set first, then delete it: a kill in between leaves a hidden folder only."""
    trash = path.parent / trash_name
    if trash.exists():
        shutil.rmtree(trash)
    os.rename(path, trash)
    shutil.rmtree(trash)


def _remove_leftovers(root: Path) -> None:
    """Delete what interrupted saves and deletions left: hidden `.checkpoint-*.tmp` / `.deleting` folders and
    `.checkpoints.json.*.tmp` files."""
    for path in root.glob(f".{CHECKPOINT_PREFIX}*"):
        if path.is_dir() and path.name.endswith((".tmp", ".deleting")):
            shutil.rmtree(path, ignore_errors=True)
    for path in root.glob(f".{RECORD_FILE}.*.tmp"):
        with contextlib.suppress(OSError):
            path.unlink()


def save_checkpoint(
    accelerator: Accelerator,
    checkpoint_root: PathLike,
    step: int,
    extra_state: Optional[dict[str, Any]] = None,
    total_limit: Optional[int] = None,
) -> Path:
    """`accelerator.save_state` into `checkpoint_root/checkpoint-<step>`, atomically. Call it on every process.

    Every process writes its state into one temporary directory beside the checkpoint; once all have finished, the
    main process writes `training_state.json` (the step, `extra_state`, and the manifest of every file written), and
    the package's atomic directory writer renames it into place (an existing `checkpoint-<step>`, e.g. after a
    rollback, is first renamed to a backup, which is restored if the rename fails). The checkpoint is then recorded as
    the latest save in `checkpoints.json`. A run killed at any point leaves the previous checkpoints complete.

    Args:
        accelerator (`Accelerator`): The accelerator (with [`register_adapter_checkpointing`] for adapter-only
            checkpoints). Objects given to `register_for_checkpointing` are saved too; resuming checks that they load
            with torch's `weights_only` unpickler.
        checkpoint_root (`str` or `os.PathLike`): Directory of the checkpoints.
        step (`int`): The optimizer step reached.
        extra_state (`dict`, *optional*): JSON-serialisable state stored in `training_state.json` with the step.
        total_limit (`int`, *optional*): Keep at most this many checkpoints: the most recently saved ones.

    Returns:
        `Path`: The checkpoint directory.

    Raises:
        CheckpointError: On every process, if the main process cannot write the checkpoint. The package's writer
            replaces only adapter directories, so re-saving an existing step needs a model with an adapter named
            "default" (whose `adapter_config.json` sits at the top of the checkpoint).

    Example:

    ```py
    >>> save_checkpoint(accelerator, "out/checkpoints", step=100, extra_state={"losses": losses}, total_limit=2)
    ```
    """
    if total_limit is not None and total_limit < 1:
        raise ValueError(f"total_limit must be at least 1 (or None to keep every checkpoint), got {total_limit}.")
    root = Path(checkpoint_root)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    with contextlib.ExitStack() as stack:
        shared: list[Optional[str]] = [None, None]  # the temporary directory, or why there is none
        if accelerator.is_main_process:
            try:
                root.mkdir(parents=True, exist_ok=True)
                _remove_leftovers(root)
                shared[0] = str(stack.enter_context(atomic_directory(final, overwrite=True, marker=STATE_FILE)))
            except (OSError, ValueError) as error:
                shared[1] = f"Cannot write the checkpoint {final}: {error}"
        tmp, problem = broadcast_object_list(shared)  # every process fails alike rather than waiting forever
        if problem is not None:
            raise CheckpointError(problem)
        tmp_dir = Path(tmp)
        accelerator.save_state(str(tmp_dir))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            files = sorted(str(p.relative_to(tmp_dir)) for p in tmp_dir.rglob("*") if p.is_file())
            state = {
                **(extra_state or {}),
                "step": step,
                "num_processes": accelerator.num_processes,
                "files": files,
            }
            with open(tmp_dir / STATE_FILE, "w", encoding="utf-8") as f:
                json.dump(state, f)
                f.flush()
                os.fsync(f.fileno())
    if accelerator.is_main_process:
        saved = [name for name in _read_record(root) if name != final.name] + [final.name]
        _write_record(root, saved)
        if total_limit is not None:
            listed = list_checkpoints(root)
            oldest = listed[: max(len(listed) - total_limit, 0)]
            if oldest:
                _write_record(root, [name for name in saved if name not in {p.name for p in oldest}])
            for old in oldest:
                _remove(old, f".{old.name}.deleting")
    accelerator.wait_for_everyone()
    return final


def remove_checkpoints(checkpoint_root: PathLike) -> None:
    """Delete every checkpoint in `checkpoint_root`, and the root itself if nothing else is left in it.

    Each checkpoint is renamed out of the listed set before it is deleted, so an interrupted call leaves no checkpoint
    that [`list_checkpoints`] reports.

    Example:

    ```py
    >>> remove_checkpoints("out/checkpoints")  # the run finished; its checkpoints are no longer needed
    ```
    """
    root = Path(checkpoint_root)
    if not root.is_dir():
        return
    _write_record(root, [])
    for path in sorted(root.iterdir()):
        if path.is_dir() and _step_of(path) is not None:
            _remove(path, f".{path.name}.deleting")
    _remove_leftovers(root)
    (root / RECORD_FILE).unlink()
    with contextlib.suppress(OSError):
        root.rmdir()


def check_no_unsafe_pickles(checkpoint: PathLike) -> None:
    """Refuse a checkpoint holding any pickled file that torch's `weights_only` unpickler does not accept.

    Accelerate unpickles optimizer, scheduler and RNG states with `weights_only=True` (its RNG file is skipped
    silently when that fails), and objects given to `register_for_checkpointing` with `weights_only=False`. Checking
    every pickled file first, with the same allow-list Accelerate uses, means nothing in a checkpoint can run code,
    and a refused file is an error rather than a state that is silently not restored.

    Raises:
        CheckpointError: Naming the file.

    Example:

    ```py
    >>> check_no_unsafe_pickles("out/checkpoints/checkpoint-100")
    ```
    """
    for path in sorted(Path(checkpoint).rglob("*")):
        if not path.is_file() or path.name.endswith(_NOT_PICKLED):
            continue
        try:
            accelerate_load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - any failure of the safe unpickler means the file is refused
            raise CheckpointError(
                f"{path} cannot be loaded safely: torch's weights_only unpickler refused it ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else ''}). It holds objects other than tensors and "
                "plain data, so it was modified or not written by save_checkpoint; it was not unpickled. Resume from "
                "another checkpoint."
            ) from None


def load_checkpoint(accelerator: Accelerator, checkpoint: PathLike) -> dict[str, Any]:
    """Restore a checkpoint written by [`save_checkpoint`] (adapters, optimizer, scheduler, samplers, RNG states).

    The checkpoint is checked first: complete (every file of its manifest present), every pickled file accepted by
    torch's `weights_only` unpickler, adapters of the model's configuration (with a warning if it was trained on
    another base model).

    Args:
        accelerator (`Accelerator`): The accelerator, with model, optimizer and scheduler already prepared.
        checkpoint (`str` or `os.PathLike`): The checkpoint directory (see [`resolve_checkpoint`]).

    Returns:
        `dict`: The contents of `training_state.json` without the manifest; `"step"` is the optimizer step reached.

    Raises:
        CheckpointError: If the checkpoint is incomplete, unsafe, or of another adapter configuration.

    Example:

    ```py
    >>> state = load_checkpoint(accelerator, "out/checkpoints/checkpoint-100")
    >>> state["step"]
    100
    ```
    """
    path = Path(checkpoint)
    problems = checkpoint_problems(path)
    if problems:
        raise CheckpointError(
            f"{path} is not a complete checkpoint ({'; '.join(problems)}): a save or a deletion of it was "
            "interrupted. Resume from another one."
        )
    check_no_unsafe_pickles(path)
    accelerator.load_state(str(path))
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    state.pop("files", None)
    return state

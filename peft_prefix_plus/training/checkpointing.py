"""Adapter-only, atomic training checkpoints with Accelerate.

- [`register_adapter_checkpointing`]: `accelerator.save_state` / `load_state` store every adapter of a prepared
  [`~peft.PeftModel`] with PEFT's own `save_pretrained` / `load_peft_weights` (each adapter with its own config; the
  frozen base model is not written), instead of the whole state dict.
- [`save_checkpoint`]: `accelerator.save_state` into `checkpoint-<step>`, written atomically by the package's one
  directory writer, with a manifest of every file the save wrote. The checkpoint root records the saves in the order
  they completed (`checkpoints.json`), so `"latest"` is the most recent save, also after a rollback; `total_limit`
  prunes the oldest saves by first renaming them out of the listed set, then deleting them.
  One run saves into a folder: it is locked for the saving process (`.checkpoints.lock`), and a second run is refused
  ("written by another process") before it writes anything. A failed save (a full disk) says what failed and where;
  nothing of it is kept and the earlier checkpoints are intact.
- [`list_checkpoints`], [`resolve_checkpoint`]: only complete checkpoints (every file of the manifest present); a
  malformed `checkpoints.json` is a clear error naming it (the next save rewrites it).
- [`load_checkpoint`]: refuses an incomplete checkpoint, one of another adapter configuration (shapes,
  `init_weights`, `modules_to_save`), and any pickled file that torch's `weights_only` unpickler refuses (a tampered
  file is never run, and never silently skipped), then restores it with `accelerator.load_state`.

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
import errno
import json
import os
import re
import shutil
import socket
import threading
import warnings
from pathlib import Path
from typing import Any, Optional, Union

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, gather_object
from accelerate.utils import load as accelerate_load
from peft import PeftConfig, PeftModel, load_peft_weights, set_peft_model_state_dict
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors import SafetensorError

from ..errors import AdapterFileError, CheckpointError, PrefixPlusValueError
from ..files.write import atomic_directory, atomic_file, temporary_sibling  # the package's one atomic writer

try:  # the lock that keeps a second run out of a checkpoint folder; without it (Windows) nothing is locked
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None

PathLike = Union[str, os.PathLike]

CHECKPOINT_PREFIX = "checkpoint-"
#: Written last into every checkpoint: the step, the caller's extra state and the manifest (`"files"`).
STATE_FILE = "training_state.json"
#: In the checkpoint root: the checkpoints in the order their saves completed; the last one is `"latest"`.
RECORD_FILE = "checkpoints.json"
#: In the checkpoint root: locked by the process saving checkpoints into it (and naming it) for as long as it runs, so
#: that a second run saving into the same folder is refused instead of deleting or overwriting the first run's files.
LOCK_FILE = ".checkpoints.lock"
#: Files that hold no pickle: everything else in a checkpoint is checked with torch's `weights_only` unpickler.
_NOT_PICKLED = (".json", ".safetensors", ".md")
#: Fields of an adapter config that decide the shapes, the meaning or the set of the trained parameters: they must be
#: the same when a checkpoint is resumed (`init_weights="text"` adds the saved `prefix_init` the MLP's output is added
#: to; `modules_to_save` decides which copies of base-model modules are trained, saved and restored).
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
    "init_weights",
    "modules_to_save",
)


# ---------------------------------------------------------------------------------------------------------- the hook
def _adapter_dirs(model: PeftModel, directory: Path) -> dict[str, Path]:
    """Where `save_pretrained` puts each adapter: "default" at the top, the others in a folder of their name."""
    return {name: directory if name == "default" else directory / name for name in model.peft_config}


def _json_ready(config: PeftConfig) -> dict[str, Any]:
    return json.loads(json.dumps(config.to_dict(), default=str))


def _comparable(field: str, value: Any) -> Any:
    """A config value as resumption compares it: `modules_to_save` as a set (no module and an empty list alike)."""
    if field == "modules_to_save" and isinstance(value, (list, tuple)):
        return sorted({str(name) for name in value}) or None
    return value


def check_checkpoint_compatible(checkpoint: PathLike, model: Union[PeftModel, PeftConfig]) -> None:
    """Refuse a checkpoint whose adapters differ from the model's in a field of `SHAPE_FIELDS` (shapes,
    `init_weights`, `modules_to_save`), before anything is loaded.

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
            if _comparable(field, saved.get(field)) != _comparable(field, current.get(field)):
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


def _bad_record(path: Path, why: str, problem: str = "is malformed") -> CheckpointError:
    return CheckpointError(
        f"The record of saves {path} {problem}: {why}. It only orders the checkpoints (the last one is "
        '"latest"); the checkpoint folders themselves are intact. Delete it (the complete checkpoints are then listed '
        'by step) or fix it to the form {"latest": "checkpoint-<step>", "saved": ["checkpoint-<step>", ...]} (oldest '
        "save first); the next save_checkpoint rewrites it."
    )


def _read_record(root: Path) -> list[str]:
    """The names `checkpoints.json` records, oldest save first; `[]` when there is no record yet.

    Raises:
        CheckpointError: If the record is unreadable or not of the form `save_checkpoint` writes, naming the file and
            the way out.
    """
    path = root / RECORD_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as error:
        raise _bad_record(path, str(error), "cannot be read") from None
    try:
        record = json.loads(text)
    except ValueError as error:
        raise _bad_record(path, f"it is not valid JSON ({error})") from None
    saved = record.get("saved") if isinstance(record, dict) else None
    if (
        not isinstance(saved, list)
        or not all(isinstance(name, str) for name in saved)
        or not isinstance(record.get("latest"), (str, type(None)))
    ):
        shown = text.strip()
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise _bad_record(path, f'it holds {shown}, not a "saved" list of checkpoint names')
    return saved


def _write_record(root: Path, saved: list[str]) -> None:
    """Write the record of saves atomically, with the package's one file writer."""
    data = json.dumps({"latest": saved[-1] if saved else None, "saved": saved}, indent=2)
    in_use: list[str] = []
    try:
        with atomic_file(root / RECORD_FILE) as tmp:
            _use(tmp, in_use)  # before the temporary exists: a leftover sweep of another thread never sees it unused
            tmp.write_text(data, encoding="utf-8")
    finally:
        _forget(in_use)


def _in_order(root: Path, saved: list[str]) -> list[Path]:
    """The complete checkpoints of `root`: those `saved` does not name first (by step), then those it names."""
    if not root.is_dir():
        return []
    complete = {p.name: p for p in root.iterdir() if _step_of(p) is not None and not checkpoint_problems(p)}
    recorded = [name for name in saved if name in complete]
    others = sorted((name for name in complete if name not in recorded), key=lambda n: _step_of(complete[n]))
    return [complete[name] for name in others + recorded]


def _listed_anyway(root: Path) -> list[Path]:
    """`list_checkpoints`, by step where the record is malformed: for messages, which must not fail themselves."""
    try:
        return list_checkpoints(root)
    except CheckpointError:
        return _in_order(root, [])


def list_checkpoints(checkpoint_root: PathLike) -> list[Path]:
    """The complete checkpoints in `checkpoint_root`, in the order their saves completed (the last is `"latest"`).

    Incomplete checkpoints (a save or a deletion that was interrupted) are not listed. A save counts as done once the
    root's record (`checkpoints.json`) names it; complete checkpoints it does not name (a save killed between its
    rename and its record, or copied in by hand) come first, by step, so `"latest"` never picks one over a recorded
    save.

    Args:
        checkpoint_root (`str` or `os.PathLike`): The directory holding `checkpoint-<step>` directories.

    Raises:
        CheckpointError: If `checkpoints.json` is malformed (e.g. edited by hand), naming it and the way out.

    Example:

    ```py
    >>> list_checkpoints("out/checkpoints")
    [PosixPath('out/checkpoints/checkpoint-200'), PosixPath('out/checkpoints/checkpoint-300')]
    ```
    """
    root = Path(checkpoint_root)
    if not root.is_dir():
        return []
    return _in_order(root, _read_record(root))


def resolve_checkpoint(checkpoint_root: PathLike, spec: PathLike) -> Path:
    """Find the complete checkpoint directory that ``spec`` names: ``"latest"``, or a checkpoint's path.

    Args:
        checkpoint_root (`str` or `os.PathLike`): Where the run writes its checkpoints (used for `"latest"`).
        spec (`str` or `os.PathLike`): `"latest"` for the most recently saved complete checkpoint in
            `checkpoint_root`, or the path of a checkpoint directory.

    Raises:
        CheckpointError: If there is no such checkpoint, it is incomplete, or (for `"latest"`) `checkpoints.json` is
            malformed.

    Example:

    ```py
    >>> resolve_checkpoint("out/checkpoints", "latest")
    PosixPath('out/checkpoints/checkpoint-300')
    ```
    """
    if str(spec) == "latest":
        found = list_checkpoints(checkpoint_root)
        if not found:
            raise CheckpointError(
                f"resolve_checkpoint(spec='latest'): no complete checkpoint in {checkpoint_root}. Start from the "
                "beginning, or give the path of a checkpoint directory."
            )
        return found[-1]
    path = Path(spec)
    if not path.is_dir():
        raise CheckpointError(f"resolve_checkpoint: checkpoint {path} does not exist or is not a directory.")
    problems = checkpoint_problems(path)
    if problems:
        available = [p.name for p in _listed_anyway(path.parent)]
        raise CheckpointError(
            f"resolve_checkpoint: {path} is not a complete checkpoint ({'; '.join(problems)}); a save or a "
            "deletion of it was interrupted. Resume from another one"
            + (f" ({', '.join(available)}) or 'latest'." if available else ".")
        )
    return path


# ------------------------------------------------------------------------------------- one run per checkpoint folder
_HELD: dict[str, tuple[int, int]] = {}  # checkpoint root (resolved) -> (pid, open locked LOCK_FILE) of this process
_IN_USE: set[str] = set()  # temporaries this process is writing or deleting now (other threads must not sweep them)
_GUARD = threading.RLock()  # guards both, and makes "sweep leftovers" and "create a temporary" exclusive in a process
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS)


def _same_file(fd: int, path: Path) -> bool:
    try:
        found = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (found.st_dev, found.st_ino) == (held.st_dev, held.st_ino)


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it into the lock file (best effort)."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f" (pid {int(holder['pid'])} on {holder['host']})"
    return ""


def _another_run(root: Path, holder: str) -> CheckpointError:
    return CheckpointError(
        f"The checkpoint folder {root} is being written by another process{holder}: another run saves its "
        "checkpoints there. Nothing was written by this one, and the other run's checkpoints are untouched. Give each "
        "run its own checkpoint folder, or wait until the other run has ended."
    )


def _hold(root: Path) -> bool:
    """Lock `root` for this process until it exits (or [`remove_checkpoints`] removes the folder).

    The lock is an advisory `flock` on `root/.checkpoints.lock`, released by the kernel when the process ends, however
    it ends: a crashed or killed run never keeps its successor out. The same process may save into the folder again
    (several runs in one process, one after the other).

    Returns:
        `bool`: Whether the folder is locked; `False` where the file system has no locks (then only this process's
        own leftovers are ever swept).

    Raises:
        CheckpointError: If another live process holds the folder ("written by another process").
    """
    if fcntl is None:  # pragma: no cover - Windows
        return False
    key = str(root.resolve())
    path = root / LOCK_FILE
    with _GUARD:
        pid, fd = _HELD.pop(key, (None, None))
        if fd is not None:
            if pid == os.getpid() and _same_file(fd, path):
                _HELD[key] = pid, fd
                return True
            # the folder was removed (and made again) since, or this is a forked child: the parent's lock is not its
            os.close(fd)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise _another_run(root, holder) from None
            except OSError as error:
                os.close(fd)
                if error.errno in _NO_LOCKS:
                    return False
                raise
            if _same_file(fd, path):  # not removed by its previous holder between our open and our lock
                with contextlib.suppress(OSError):  # who holds it is for messages only (a full disk may refuse it)
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
                _HELD[key] = os.getpid(), fd
                return True
            os.close(fd)


def _release(root: Path) -> None:
    with _GUARD:
        _, fd = _HELD.pop(str(root.resolve()), (None, None))
        if fd is not None:
            os.close(fd)


def _use(path: Path, in_use: list[str]) -> None:
    with _GUARD:
        _IN_USE.add(str(path.absolute()))
        in_use.append(str(path.absolute()))


def _forget(in_use: list[str]) -> None:
    with _GUARD:
        _IN_USE.difference_update(in_use)


def _pid_of(path: Path) -> Optional[int]:
    """The process that made a temporary (see `files.write.temporary_sibling`); `None` for other names."""
    match = re.search(r"\.(\d+)-[0-9a-f]+\.(?:tmp|deleting|old)$", path.name)
    return int(match.group(1)) if match else None


def _remove(path: Path) -> None:
    """Rename `path` out of the listed set first, then delete it: a kill in between leaves a hidden folder only."""
    in_use: list[str] = []
    try:
        with _GUARD:
            trash = temporary_sibling(path, "deleting")
            os.rename(path, trash)
            _use(trash, in_use)
        shutil.rmtree(trash)
    finally:
        _forget(in_use)


def _remove_leftovers(root: Path, held: bool) -> None:
    """Delete what interrupted saves and deletions left: hidden `.checkpoint-*.tmp` / `.deleting` folders and
    `.checkpoints.json.*.tmp` files, never one this process is using.

    With the folder locked ([`_hold`]) no other live process can be writing into it, so every leftover is abandoned;
    without locks only this process's own leftovers (its process id is in their names) are deleted.
    """
    with _GUARD:
        found = [p for p in root.glob(f".{CHECKPOINT_PREFIX}*") if p.name.endswith((".tmp", ".deleting"))]
        found += list(root.glob(f".{RECORD_FILE}.*.tmp"))
        for path in found:
            if str(path.absolute()) in _IN_USE or not (held or _pid_of(path) == os.getpid()):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()


# ----------------------------------------------------------------------------------------------------- failed saves
_FULL = ("No space left on device", "Disk quota exceeded", "StorageFull", "os error 28", "os error 122")


def _disk_full(error: BaseException) -> bool:
    """Whether `error` (or what caused it) says the disk is full: ENOSPC/EDQUOT, or safetensors' text of them."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(text in str(error) for text in _FULL):
            return True
        error = error.__cause__ or error.__context__
    return False


def _write_failure(error: BaseException) -> bool:
    """Whether `error` is a failure to write files (rather than a bug): I/O errors, safetensors' and torch's."""
    text = str(error)
    return (
        isinstance(error, (OSError, SafetensorError))
        or (isinstance(error, RuntimeError) and ("write failed" in text or "failed writing" in text))
        or _disk_full(error)
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _explain(error: Exception, root: Path, final: Path, stage: str) -> Optional[str]:
    """The message of the `CheckpointError` a failed save raises, or `None` to re-raise `error` unchanged (a bug).

    `stage` is where the save failed: `"start"` (nothing written yet), `"write"` (into the temporary folder, which
    is then deleted), `"commit"` (the rename into place, undone), `"record"` (the checkpoint is in place, but
    `checkpoints.json` could not be written) or `"prune"` (the new checkpoint is recorded; never explained).
    """
    if isinstance(error, CheckpointError):
        return str(error)
    if isinstance(error, AdapterFileError) and "written by another process" in str(error):
        return str(_another_run(root, ""))
    full = _disk_full(error) and stage != "prune"
    explained = full or {
        "start": isinstance(error, (OSError, ValueError)),
        "write": isinstance(error, AdapterFileError) or _write_failure(error),
        "commit": isinstance(error, AdapterFileError),
        "record": _write_failure(error),
    }.get(stage, False)
    if not explained:
        return None
    reason = f"the disk is full ({_first_line(error)})" if full else _first_line(error)
    advice = " Free some space on that disk (or keep fewer checkpoints: total_limit) and save again." if full else ""
    listed = [p.name for p in _listed_anyway(root)]
    latest = f'"latest" is {listed[-1]}' if listed else "there is none"
    if stage == "record":
        return (
            f"The checkpoint {final.name} was written into {root} and is complete, but recording it in "
            f"{root / RECORD_FILE} failed: {reason}. The earlier checkpoints are intact; {latest}.{advice}"
        )
    if stage == "start" and not full:
        return f"Cannot write the checkpoint {final}: {error}"
    return (
        f"The checkpoint {final.name} could not be written into {root}: {reason}. Nothing of it was kept (its "
        f"temporary folder was deleted), and the earlier checkpoints are intact ({latest}).{advice}"
    )


def _settle(
    accelerator: Accelerator,
    failure: Optional[Exception],
    root: Path,
    final: Path,
    stage: str,
    everyone: bool,
) -> None:
    """Tell every process whether a step of the save failed (on any process when `everyone`, else on the main one),
    and raise on all of them if so: no process is left waiting for one that gave up."""
    note = None  # what the other processes raise: the explanation, or which process failed and how
    if failure is not None:
        explained = _explain(failure, root, final, stage)
        note = explained or (
            f"The checkpoint {final} was not saved: process {accelerator.process_index} failed "
            f"({_first_line(failure)})."
        )
    notes = [note]
    if accelerator.num_processes > 1:
        if everyone:
            try:
                notes = gather_object([note])
            except NotImplementedError:  # pragma: no cover - TPU: every process raises its own error, or none
                accelerator.wait_for_everyone()
        else:
            notes = broadcast_object_list([note])
    if failure is not None:
        if explained is None or isinstance(failure, CheckpointError):
            raise failure
        raise CheckpointError(explained) from failure
    problem = next((n for n in notes if n is not None), None)
    if problem is not None:
        raise CheckpointError(problem)


def _begin(root: Path, final: Path, stack: contextlib.ExitStack) -> Path:
    """Lock the folder for this run, sweep abandoned leftovers, and open the temporary folder of the checkpoint."""
    root.mkdir(parents=True, exist_ok=True)
    held = _hold(root)
    in_use: list[str] = []
    stack.callback(_forget, in_use)  # runs after the writer's commit or clean-up
    with _GUARD:
        _remove_leftovers(root, held)
        tmp = stack.enter_context(atomic_directory(final, overwrite=True, marker=STATE_FILE))
        _use(tmp, in_use)
    return tmp


def _record(root: Path, final: Path) -> list[str]:
    """Record `final` as the latest save (rewriting a malformed record); return the names recorded."""
    try:
        earlier = _read_record(root)
    except CheckpointError as error:
        warnings.warn(
            f"{error} It was rewritten now, with the complete checkpoints in the order of their steps.",
            UserWarning,
            stacklevel=3,
        )
        earlier = [p.name for p in _in_order(root, [])]
    saved = [name for name in earlier if name != final.name] + [final.name]
    _write_record(root, saved)
    return saved


def _prune(root: Path, saved: list[str], total_limit: int) -> None:
    """Keep the `total_limit` most recent saves: unlist the others first, then delete them."""
    listed = list_checkpoints(root)
    oldest = listed[: max(len(listed) - total_limit, 0)]
    if oldest:
        _write_record(root, [name for name in saved if name not in {p.name for p in oldest}])
    for old in oldest:
        _remove(old)


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

    One run saves into a folder: the first save locks it for its process (`.checkpoints.lock`, released when the
    process ends, however it ends), and another process saving into it meanwhile is refused before it writes
    anything. Temporary names carry the process id and a random token; a save sweeps only abandoned leftovers (of
    interrupted saves of this process, or of runs that have ended), never a temporary in use.

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
        CheckpointError: On every process, if the checkpoint cannot be written: another process is saving into the
            folder ("written by another process"), the disk is full or a file cannot be written (the message says
            where, and that nothing of the failed save was kept and the earlier checkpoints are intact), or the
            destination is refused. The package's writer replaces only adapter directories, so re-saving an existing
            step needs a model with an adapter named "default" (whose `adapter_config.json` sits at the top of the
            checkpoint). A malformed `checkpoints.json` is rewritten, with a warning.

    Example:

    ```py
    >>> save_checkpoint(accelerator, "out/checkpoints", step=100, extra_state={"losses": losses}, total_limit=2)
    ```
    """
    if total_limit is not None and total_limit < 1:
        raise PrefixPlusValueError(
            f"total_limit must be at least 1 (or None to keep every checkpoint), got {total_limit}."
        )
    root = Path(checkpoint_root)
    final = root / f"{CHECKPOINT_PREFIX}{step}"
    main = accelerator.is_main_process
    with contextlib.ExitStack() as stack:
        failure: Optional[Exception] = None
        tmp: Optional[Path] = None
        if main:
            try:
                tmp = _begin(root, final, stack)
            except Exception as error:  # noqa: BLE001 - every process must learn of it (see _settle)
                failure = error
        _settle(accelerator, failure, root, final, "start", everyone=False)
        tmp_dir = Path(broadcast_object_list([str(tmp) if tmp else None])[0])
        try:
            accelerator.save_state(str(tmp_dir))
        except Exception as error:  # noqa: BLE001
            failure = error
        _settle(accelerator, failure, root, final, "write", everyone=True)  # raising here deletes the temporary
        stage = "write"
        if main:
            try:
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
                stage = "commit"
                stack.close()  # the rename into place (restoring the previous checkpoint-<step> if it fails)
                stage = "record"
                saved = _record(root, final)
                stage = "prune"
                if total_limit is not None:
                    _prune(root, saved, total_limit)
            except Exception as error:  # noqa: BLE001
                failure = error
        _settle(accelerator, failure, root, final, stage, everyone=False)
    return final


def remove_checkpoints(checkpoint_root: PathLike) -> None:
    """Delete every checkpoint in `checkpoint_root`, and the root itself if nothing else is left in it.

    Each checkpoint is renamed out of the listed set before it is deleted, so an interrupted call leaves no checkpoint
    that [`list_checkpoints`] reports. A folder another live process saves into is refused.

    Raises:
        CheckpointError: If another process is saving checkpoints into the folder.

    Example:

    ```py
    >>> remove_checkpoints("out/checkpoints")  # the run finished; its checkpoints are no longer needed
    ```
    """
    root = Path(checkpoint_root)
    if not root.is_dir():
        return
    held = _hold(root)
    try:
        _write_record(root, [])
        for path in sorted(root.iterdir()):
            if path.is_dir() and _step_of(path) is not None:
                _remove(path)
        _remove_leftovers(root, held)
        (root / RECORD_FILE).unlink()
        if held:  # removed while still locked: a process that opened it meanwhile sees it is gone and locks anew
            (root / LOCK_FILE).unlink()
    finally:
        _release(root)
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
    for index, model in enumerate(accelerator._models):  # every model's adapters, before any of them is loaded
        model = accelerator.unwrap_model(model)
        if isinstance(model, PeftModel):
            check_checkpoint_compatible(path / (f"model_{index}" if index else ""), model)
    check_no_unsafe_pickles(path)
    accelerator.load_state(str(path))
    state = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    state.pop("files", None)
    return state

"""Training helpers for the examples (not part of the `peft_prefix_plus` library).

- [`make_dataloader`]: a seeded, shuffled dataloader whose order does not depend on the number of processes, so a
  run can be resumed exactly (Accelerate shards it across ranks in `prepare`).
- [`resume_position`]: where an optimizer step falls in the data, to skip to it on resume.
- [`check_output_dir`], [`clear_output_dir`]: the example's output-folder policy (a finished run is not overwritten
  by accident, and overwriting removes only what the example wrote).
- [`gather_sum`], [`plot_loss`].

The checkpoints themselves (adapter-only, atomic, pickle-safe) come from the library: `peft_prefix_plus.training.checkpointing`.

Example:

```py
>>> loader = make_dataloader(rows, 8, collate, seed=0)
>>> epoch, skip = resume_position(step, len(prepared_loader), gradient_accumulation_steps=2)
```
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional, Union

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from peft_prefix_plus.training.checkpointing import CHECKPOINT_PREFIX, remove_checkpoints

#: The name of the file that marks a finished run in an output directory.
SUMMARY_FILE = "summary.json"
#: Everything the example writes into its output directory; `--overwrite_output_dir` removes these and nothing else.
OUTPUTS = ("adapter", "checkpoints", SUMMARY_FILE, "loss.png", "samples.md")


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


def clear_output_dir(output_dir: Union[str, Path]) -> None:
    """Remove what an earlier run of the example wrote to `output_dir` (see `OUTPUTS`), and nothing else.

    Example:

    ```py
    >>> clear_output_dir("outputs/data_to_text")  # --overwrite_output_dir
    ```
    """
    path = Path(output_dir)
    remove_checkpoints(path / "checkpoints")
    for name in OUTPUTS:
        target = path / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


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

"""Merging the MLP of a saved adapter into raw prefixes, using only its files (no base model).

The saved tensors are loaded into the real encoders (built on the meta device) and merged by the function the
in-memory `merge_mlp` uses, so an on-disk merge equals an in-memory merge by construction.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Union

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from ..tuner.merge import mark_config_merged, merge_site_encoders
from .card import CARD_NAME, adapter_summary, write_card
from .read import KEY_PREFIX, PrefixPlusFiles, read_prefix_plus_adapter, require_finite
from .write import atomic_directory, check_destination, write_adapter_files

PathLike = Union[str, os.PathLike]
#: Trainer checkpoint state, which refers to the MLP's parameters and is not carried over by a merge.
TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin")


def copy_side_files(src: Path, dst: Path) -> None:
    """Copy the files of ``src`` that are neither the adapter itself nor Trainer state (e.g. the model card).

    Copies are new files (umask permissions) with the same content; subdirectories are not copied.

    Args:
        src (`Path`): The source adapter directory.
        dst (`Path`): The directory being written.

    Example:

    ```py
    >>> copy_side_files(Path("checkpoint"), tmp)
    ```
    """
    for path in src.iterdir():
        skip = path.name in (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, *TRAINING_STATE_FILES)
        if path.is_file() and not skip and not path.name.startswith("rng_state"):
            shutil.copyfile(path, dst / path.name)


def refresh_card(directory: Path, adapter_id: str) -> None:
    """Refresh the generated section of the model card in ``directory``, if there is one.

    A card whose YAML front matter cannot be parsed is cosmetic: it is kept unchanged, with a warning.

    Args:
        directory (`Path`): A directory holding an adapter and maybe a ``README.md``.
        adapter_id (`str`): The repo id or path the card's usage snippet names.

    Example:

    ```py
    >>> refresh_card(tmp, "adapters/merged")
    ```
    """
    if not (directory / CARD_NAME).is_file():
        return
    # a card whose YAML does not parse is warned about and left unchanged by write_card
    adapter = read_prefix_plus_adapter(directory)
    write_card(directory, [adapter_summary("default", adapter.config, adapter.all_tensors())], adapter_id=adapter_id)


def merged_prefixes(adapter: PrefixPlusFiles, action: str) -> tuple[dict[str, torch.Tensor], bool]:
    """The raw prefixes of a read adapter: its tensors loaded into the real encoders and merged by the function
    the in-memory `merge_mlp` uses. Non-finite values are refused, in the input and in the result.

    Args:
        adapter ([`PrefixPlusFiles`]): From `read_prefix_plus_adapter`.
        action (`str`): What is refused on non-finite values, e.g. ``"merge"``.

    Returns:
        `tuple`: ``({"<site>.prefix": tensor}, whether an MLP was merged)``.

    Example:

    ```py
    >>> prefixes, merged = merged_prefixes(read_prefix_plus_adapter("checkpoint"), "merge")
    >>> prefixes["self.prefix"].shape
    torch.Size([2, 2, 2, 3, 8])
    ```
    """
    adapter.require_finite(action)
    encoders = adapter.site_encoders()
    merged = merge_site_encoders(encoders.values())
    prefixes = encoders.state_dict()
    require_finite(prefixes, f"{adapter.directory} (the merged prefixes overflow {adapter.dtype})", action)
    return prefixes, merged


def merge_mlp_files(src: PathLike, dst: PathLike, overwrite: bool = False) -> Path:
    """Merge the MLP of a saved PrefixPlus adapter into raw prefixes, using only its files.

    Gives the same tensors as `peft_model.merge_mlp()` followed by `save_pretrained`, without the base model. An
    adapter that is already raw is copied unchanged, with a warning. An adapter holding NaN or infinite values is
    refused. Tensors saved for ``modules_to_save`` are carried over unchanged. Other files of ``src`` are copied (the
    model card's generated section is refreshed to show the merge); Trainer state (optimizer, scheduler, ...) is not,
    as it refers to the MLP. ``src`` is never modified; ``dst`` is written atomically.

    Args:
        src (`str` or `os.PathLike`): A saved PrefixPlus adapter.
        dst (`str` or `os.PathLike`): Where to write the merged adapter.
        overwrite (`bool`): Replace an existing ``dst`` (only an adapter directory or an empty one).

    Returns:
        `Path`: ``dst``.

    Raises:
        AdapterFileError: For a bad adapter or a refused destination, naming the problem.

    Example:

    ```py
    >>> from peft_prefix_plus import merge_mlp_files
    >>> merge_mlp_files("checkpoints/best", "adapters/merged")
    ```
    """
    check_destination(dst, overwrite=overwrite, sources=(src,))
    adapter = read_prefix_plus_adapter(src)
    prefixes, merged = merged_prefixes(adapter, "merge")
    config = adapter.config
    if merged:
        mark_config_merged(config)
    else:
        warnings.warn(
            f"{src} already holds raw prefixes (prefix_projection=False): there is no MLP to merge; "
            "it is copied unchanged.",
            UserWarning,
            stacklevel=2,
        )
    tensors = {KEY_PREFIX + name: tensor for name, tensor in prefixes.items()}
    with atomic_directory(dst, overwrite=overwrite, sources=(src,)) as tmp:
        copy_side_files(Path(src), tmp)
        write_adapter_files(tmp, config, tensors | adapter.extra_tensors)
        refresh_card(tmp, adapter_id=str(dst))
    return Path(dst)

"""Describing a saved adapter (``prefix-plus inspect``): sites, MLP or raw, merge record, sizes, non-finite values."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME

from ..tuner.geometry import format_layer_shapes
from .card import CARD_NAME
from .read import read_prefix_plus_adapter

PathLike = Union[str, os.PathLike]

#: The files a saved adapter consists of, directly in its folder: the config, the weights and, if there is one, the
#: model card. ``size_on_disk`` counts these; anything else below the folder (a checkpoint folder, Trainer state,
#: logs) is reported apart.
ADAPTER_FILES = (CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, CARD_NAME)


def directory_size(directory: PathLike) -> int:
    """Total size in bytes of the files under ``directory``.

    Args:
        directory (`str` or `os.PathLike`): A directory.

    Example:

    ```py
    >>> directory_size("my-adapter")
    10584
    ```
    """
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())


def disk_usage(directory: PathLike) -> dict[str, Any]:
    """Bytes on disk of a saved adapter's own files (:data:`ADAPTER_FILES`), and of every other file below its folder.

    A checkpoint folder or Trainer state kept inside the adapter's folder is not part of the adapter: it is counted
    apart, with the names of the folder's entries that hold it.

    Args:
        directory (`str` or `os.PathLike`): A saved adapter's folder.

    Returns:
        `dict`: ``adapter_files`` (name to bytes, for those present), ``size_on_disk`` (their sum), ``other_files``
        (how many other files), ``other_files_size`` (their bytes) and ``other_entries`` (the folder's entries that
        hold them, folders with a trailing ``/``).

    Example:

    ```py
    >>> usage = disk_usage("outputs/data_to_text/adapter")
    >>> usage["size_on_disk"], usage["other_entries"]
    (10584, ['checkpoint-60/'])
    ```
    """
    directory = Path(directory)
    own = {name: (directory / name).stat().st_size for name in ADAPTER_FILES if (directory / name).is_file()}
    others = [
        path for path in directory.rglob("*") if path.is_file() and path.relative_to(directory).as_posix() not in own
    ]
    entries = {
        path.relative_to(directory).parts[0] + ("/" if len(path.relative_to(directory).parts) > 1 else "")
        for path in others
    }
    return {
        "adapter_files": own,
        "size_on_disk": sum(own.values()),
        "other_files": len(others),
        "other_files_size": sum(path.stat().st_size for path in others),
        "other_entries": sorted(entries),
    }


def inspect_adapter(directory: PathLike) -> dict[str, Any]:
    """Describe a saved PrefixPlus adapter: sites, MLP shape or raw, merge record, parameter count, size on disk (its
    own files; other files below its folder apart).

    The adapter is validated by the one reader (config against tensors, dtypes, sizes), so a corrupt adapter raises
    `AdapterFileError`. NaN or infinite values are reported (``nonfinite``), not refused.

    Args:
        directory (`str` or `os.PathLike`): A saved PrefixPlus adapter.

    Returns:
        `dict`: JSON-serialisable: ``path``, ``peft_type``, ``task_type``, ``base_model_name_or_path``, ``sites`` (per
        site: ``num_virtual_tokens``, ``layers``, ``num_layers``, ``num_key_value_heads`` and ``head_dim`` (of the
        first layer), ``layer_shapes`` (``[heads, key dim, value dim]`` per transformed layer),
        ``num_parameters``), ``mlp`` (the MLP shape, or ``"raw"``), ``merged``, ``merged_from``,
        ``offset_position_ids``, ``num_parameters``, ``raw_prefix_parameters``, ``dtype``, ``modules_to_save`` (the
        names of the extra tensors), ``nonfinite`` (NaN/Inf count per tensor that has any), and from `disk_usage`:
        ``size_on_disk`` (the bytes of the adapter's own files: config, weights and model card, listed in
        ``adapter_files``) and, apart, ``other_files``, ``other_files_size`` and ``other_entries`` (anything else below
        the folder, such as a checkpoint folder).

    Example:

    ```py
    >>> from peft_prefix_plus import inspect_adapter
    >>> inspect_adapter("adapters/merged")["mlp"]
    'raw'
    ```
    """
    adapter = read_prefix_plus_adapter(directory)
    config = adapter.config
    sites = {}
    for site, geometry in adapter.geometry.items():
        sites[site] = {
            "num_virtual_tokens": geometry.num_virtual_tokens,
            "layers": list(geometry.layer_indices),
            "num_layers": geometry.num_layers,
            "num_key_value_heads": geometry.num_key_value_heads,
            "head_dim": geometry.head_dim,
            "layer_shapes": [list(shape) for shape in geometry.transformed_layer_shapes],
            "num_parameters": sum(t.numel() for name, t in adapter.tensors.items() if name.split(".")[0] == site),
        }
    return {
        "path": str(directory),
        "peft_type": adapter.raw_config["peft_type"],
        "task_type": adapter.raw_config.get("task_type"),
        "base_model_name_or_path": adapter.raw_config.get("base_model_name_or_path"),
        "sites": sites,
        "mlp": config.mlp_shape or "raw",
        "merged": config.merged_from is not None,
        "merged_from": config.merged_from,
        "offset_position_ids": config.offset_position_ids,
        "num_parameters": sum(info["num_parameters"] for info in sites.values()),
        "raw_prefix_parameters": sum(g.out_features * g.num_virtual_tokens for g in adapter.geometry.values()),
        "dtype": str(adapter.dtype).replace("torch.", ""),
        "modules_to_save": sorted(adapter.extra_tensors),
        "nonfinite": adapter.nonfinite(),
        **disk_usage(directory),
    }


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable text for the result of `inspect_adapter`.

    Args:
        info (`dict`): The result of `inspect_adapter`.

    Example:

    ```py
    >>> print(format_inspection(inspect_adapter("adapters/merged")))
    ```
    """
    lines = [f"PrefixPlus adapter: {info['path']}", f"  task type:       {info['task_type']}"]
    if info["base_model_name_or_path"]:
        lines.append(f"  base model:      {info['base_model_name_or_path']}")
    lines.append("  sites:")
    for site, site_info in info["sites"].items():
        layers = site_info["layers"]
        layer_text = "all" if len(layers) == site_info["num_layers"] else ", ".join(map(str, layers))
        lines.append(
            f"    {site:<8} prefix length {site_info['num_virtual_tokens']}, layers {layer_text} "
            f"(of {site_info['num_layers']}), key/value heads × head dim "
            f"{format_layer_shapes([tuple(shape) for shape in site_info['layer_shapes']])}"
        )
    mlp = info["mlp"]
    if mlp == "raw":
        lines.append("  MLP:             raw (no MLP)")
    else:
        lines.append(f"  MLP:             depth {mlp['depth']}, hidden size {mlp['hidden_size']}, {mlp['activation']}")
    if info["merged"]:
        shape = ", ".join(f"{key} {value}" for key, value in info["merged_from"].items())
        lines.append(f"  merged:          yes, from an MLP with {shape}")
    else:
        lines.append("  merged:          no")
    lines.append(f"  parameters:      {info['num_parameters']:,} (raw prefixes: {info['raw_prefix_parameters']:,})")
    lines.append(f"  dtype:           {info['dtype']}")
    if info["modules_to_save"]:
        lines.append(f"  modules_to_save: {', '.join(info['modules_to_save'])}")
    lines.append(f"  size on disk:    {info['size_on_disk']:,} bytes ({', '.join(info['adapter_files'])})")
    if info["other_files"]:
        entries = info["other_entries"]
        shown = ", ".join(entries[:3]) + (f" and {len(entries) - 3} more" if len(entries) > 3 else "")
        files = "1 file" if info["other_files"] == 1 else f"{info['other_files']:,} files"
        lines.append(
            f"  other files:     {info['other_files_size']:,} bytes in {files} in the folder ({shown}), not part of "
            "the adapter"
        )
    for key, count in info["nonfinite"].items():
        lines.append(f"  WARNING: {key} holds {count} non-finite values (NaN or Inf); the adapter is broken.")
    return "\n".join(lines)

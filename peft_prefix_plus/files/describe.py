"""Describing a saved adapter (``prefix-plus inspect``): sites, MLP or raw, merge record, sizes, non-finite values."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

from .read import read_prefix_plus_adapter

PathLike = Union[str, os.PathLike]


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


def inspect_adapter(directory: PathLike) -> dict[str, Any]:
    """Describe a saved PrefixPlus adapter: sites, MLP shape or raw, merge record, parameter count, size on disk.

    The adapter is validated by the one reader (config against tensors, dtypes, sizes), so a corrupt adapter raises
    `AdapterFileError`. NaN or infinite values are reported (``nonfinite``), not refused.

    Args:
        directory (`str` or `os.PathLike`): A saved PrefixPlus adapter.

    Returns:
        `dict`: JSON-serialisable: ``path``, ``peft_type``, ``task_type``, ``base_model_name_or_path``, ``sites`` (per
        site: ``num_virtual_tokens``, ``layers``, ``num_layers``, ``num_key_value_heads``, ``head_dim``,
        ``num_parameters``), ``mlp`` (the MLP shape, or ``"raw"``), ``merged``, ``merged_from``,
        ``offset_position_ids``, ``num_parameters``, ``raw_prefix_parameters``, ``dtype``, ``modules_to_save`` (the
        names of the extra tensors), ``nonfinite`` (NaN/Inf count per tensor that has any) and ``size_on_disk``.

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
        "size_on_disk": directory_size(directory),
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
            f"(of {site_info['num_layers']}), {site_info['num_key_value_heads']} key/value heads x "
            f"head_dim {site_info['head_dim']}"
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
    lines.append(f"  size on disk:    {info['size_on_disk']:,} bytes")
    for key, count in info["nonfinite"].items():
        lines.append(f"  WARNING: {key} holds {count} non-finite values (NaN or Inf); the adapter is broken.")
    return "\n".join(lines)

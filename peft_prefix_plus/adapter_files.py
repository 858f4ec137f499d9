"""Working on saved adapters using only their files: merge, inspect, and conversion to and from stock PEFT.

Nothing here loads a model; only ``adapter_config.json`` and ``adapter_model.safetensors`` are read, so every
function runs on a machine without a GPU or the base model. Every function that writes validates its input
completely first, never modifies its source, and writes its destination atomically: into a temporary directory
beside it, renamed into place at the end. A failure leaves no destination (or the previous one, untouched).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .config import SITES, PrefixPlusConfig
from .layer import build_mlp
from .merge import mark_config_merged, project_in_float32
from .registration import PEFT_TYPE_NAME

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: Key prefix of PrefixPlus tensors in a saved adapter (followed by ``<site>.<parameter>``).
KEY_PREFIX = "base_model.model.prefix_plus_layer.prefix_plus_sites."
#: Trainer checkpoint state, which refers to the MLP's parameters and is not carried over by a merge.
TRAINING_STATE_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "trainer_state.json", "training_args.bin")
STOCK_PEFT_TYPE = "PREFIX_TUNING"

PathLike = Union[str, os.PathLike]


from .files.errors import AdapterFileError  # noqa: E402


# ---------------------------------------------------------------------------------------------------- reading
def read_adapter_config(directory: PathLike) -> dict[str, Any]:
    """Read ``adapter_config.json`` of a saved adapter as a dict.

    Args:
        directory (`str` or `os.PathLike`): The adapter directory.

    Raises:
        AdapterFileError: If the directory or file is missing, or the file is not a JSON object with a `peft_type`.

    Example:

    ```py
    >>> read_adapter_config("my-adapter")["peft_type"]
    'PREFIX_PLUS'
    ```
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory} is not a directory holding a saved adapter.")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing: {directory} does not hold a saved PEFT adapter.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterFileError(f"{path} is not valid JSON ({error}).") from error
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise AdapterFileError(f"{path} is not a PEFT adapter config: it has no `peft_type`.")
    return config


def read_adapter_tensors(directory: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor of ``adapter_model.safetensors`` and the file's metadata.

    Args:
        directory (`str` or `os.PathLike`): The adapter directory.

    Raises:
        AdapterFileError: If the file is missing, unreadable or truncated.

    Example:

    ```py
    >>> tensors, metadata = read_adapter_tensors("my-adapter")
    ```
    """
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        hint = " (only safetensors adapters are supported)" if (Path(directory) / "adapter_model.bin").exists() else ""
        raise AdapterFileError(f"{path} is missing{hint}.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
    except Exception as error:  # safetensors raises its own error types, and OSError
        raise AdapterFileError(f"{path} cannot be read; is it truncated or corrupt? ({error})") from error
    return tensors, metadata


def prefix_plus_config(raw: dict[str, Any], source: PathLike) -> PrefixPlusConfig:
    """Build a [`PrefixPlusConfig`] from a saved config dict, checking its type and its creation-time fields.

    Args:
        raw (`dict`): The content of ``adapter_config.json``.
        source (`str` or `os.PathLike`): The adapter directory, for messages.

    Example:

    ```py
    >>> config = prefix_plus_config(read_adapter_config("my-adapter"), "my-adapter")
    ```
    """
    if raw.get("peft_type") != PEFT_TYPE_NAME:
        raise AdapterFileError(
            f"{source} holds a {raw.get('peft_type')!r} adapter, not a {PEFT_TYPE_NAME} one."
            + (
                " Use `import-peft` to convert a stock PEFT prefix-tuning adapter."
                if raw.get("peft_type") == STOCK_PEFT_TYPE
                else ""
            )
        )
    names = {f.name for f in dataclasses.fields(PrefixPlusConfig) if f.init}
    try:
        config = PrefixPlusConfig(**{key: value for key, value in raw.items() if key in names and key != "peft_type"})
    except (TypeError, ValueError) as error:
        raise AdapterFileError(f"{Path(source) / CONFIG_NAME} is not a valid PrefixPlus config: {error}") from error
    shapes = config.site_shapes
    if not isinstance(shapes, dict) or not shapes or not set(shapes) <= set(SITES):
        raise AdapterFileError(
            f"{Path(source) / CONFIG_NAME} has no valid `site_shapes` (filled in when an adapter is created); "
            f"got {shapes!r}."
        )
    for site, shape in shapes.items():
        if not isinstance(shape, dict) or any(
            not isinstance(shape.get(key), int) or shape[key] < 1
            for key in ("num_layers", "num_key_value_heads", "head_dim")
        ):
            raise AdapterFileError(f"{Path(source) / CONFIG_NAME}: `site_shapes[{site!r}]` is invalid: {shape!r}.")
    if config.prefix_projection and not isinstance(config.token_dim, int):
        raise AdapterFileError(f"{Path(source) / CONFIG_NAME}: `token_dim` is missing, but the adapter uses an MLP.")
    return config


def site_layouts(config: PrefixPlusConfig) -> dict[str, dict[str, Any]]:
    """The sites a saved adapter has parameters for, with their prefix length, layers and attention shape.

    Args:
        config ([`PrefixPlusConfig`]): A config with `site_shapes` filled in.

    Returns:
        `dict`: ``{site: {"num_virtual_tokens", "layers", "num_layers", "num_key_value_heads", "head_dim",
        "shape"}}`` where ``layers`` are the indices of the transformed layers and ``shape`` the raw prefix shape.

    Example:

    ```py
    >>> site_layouts(config)["self"]["shape"]
    (2, 2, 2, 8, 8)
    ```
    """
    encoder_decoder = any(site != "self" for site in config.site_shapes)
    layouts = {}
    for site, length in config.site_lengths(encoder_decoder).items():
        shape = config.site_shapes.get(site)
        if not length or shape is None:
            continue
        layers = [
            i
            for i in range(shape["num_layers"])
            if config.layers_to_transform is None or i in config.layers_to_transform
        ]
        if not layers:
            continue
        layouts[site] = {
            "num_virtual_tokens": length,
            "layers": layers,
            "num_layers": shape["num_layers"],
            "num_key_value_heads": shape["num_key_value_heads"],
            "head_dim": shape["head_dim"],
            "shape": (len(layers), 2, shape["num_key_value_heads"], length, shape["head_dim"]),
        }
    return layouts


def expected_tensor_shapes(config: PrefixPlusConfig) -> dict[str, dict[str, tuple[int, ...]]]:
    """The tensors a saved adapter with ``config`` must hold: ``{site: {parameter name: shape}}``.

    Args:
        config ([`PrefixPlusConfig`]): A config with `site_shapes` filled in.

    Example:

    ```py
    >>> expected_tensor_shapes(config)["self"]
    {'prefix': (2, 2, 2, 8, 8)}
    ```
    """
    expected = {}
    for site, layout in site_layouts(config).items():
        shape = layout["shape"]
        if not config.prefix_projection:
            expected[site] = {"prefix": shape}
            continue
        out_features = shape[0] * 2 * shape[2] * shape[4]
        hidden = config.mlp_hidden_size or config.token_dim
        widths = [config.token_dim] + [hidden] * config.mlp_depth + [out_features]
        site_expected = {"embedding.weight": (layout["num_virtual_tokens"], config.token_dim)}
        for index in range(config.mlp_depth + 1):
            site_expected[f"mlp.{2 * index}.weight"] = (widths[index + 1], widths[index])
            site_expected[f"mlp.{2 * index}.bias"] = (widths[index + 1],)
        expected[site] = site_expected
    return expected


def split_site_tensors(
    config: PrefixPlusConfig, tensors: dict[str, torch.Tensor], source: PathLike
) -> dict[str, dict[str, torch.Tensor]]:
    """Check that the saved tensors are exactly those ``config`` calls for, and group them by site.

    Args:
        config ([`PrefixPlusConfig`]): The adapter's config.
        tensors (`dict[str, torch.Tensor]`): The tensors of ``adapter_model.safetensors``.
        source (`str` or `os.PathLike`): The adapter directory, for messages.

    Raises:
        AdapterFileError: On a missing, unexpected or wrongly shaped tensor.

    Example:

    ```py
    >>> split_site_tensors(config, tensors, "my-adapter")["self"]["prefix"].shape
    torch.Size([2, 2, 2, 8, 8])
    ```
    """
    where = Path(source) / WEIGHTS_NAME
    expected = expected_tensor_shapes(config)
    grouped: dict[str, dict[str, torch.Tensor]] = {site: {} for site in expected}
    for key, tensor in tensors.items():
        site, _, name = key[len(KEY_PREFIX) :].partition(".") if key.startswith(KEY_PREFIX) else ("", "", "")
        if site not in expected or name not in expected[site]:
            raise AdapterFileError(
                f"{where} holds the tensor {key!r}, which the config ({'MLP' if config.prefix_projection else 'raw'} "
                f"prefixes at sites {sorted(expected)}) does not call for."
            )
        if tuple(tensor.shape) != expected[site][name]:
            raise AdapterFileError(
                f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}, but the config calls for "
                f"{expected[site][name]}. The weights do not match adapter_config.json."
            )
        grouped[site][name] = tensor
    missing = [
        f"{KEY_PREFIX}{site}.{name}" for site in expected for name in expected[site] if name not in grouped[site]
    ]
    if missing:
        raise AdapterFileError(f"{where} lacks tensors the config calls for: {missing}.")
    return grouped


def load_prefix_plus_adapter(
    directory: PathLike,
) -> tuple[dict[str, Any], PrefixPlusConfig, dict[str, dict[str, torch.Tensor]]]:
    """Read and validate a saved PrefixPlus adapter: its raw config dict, its config and its tensors by site.

    Args:
        directory (`str` or `os.PathLike`): The adapter directory.

    Example:

    ```py
    >>> raw, config, sites = load_prefix_plus_adapter("my-adapter")
    ```
    """
    raw = read_adapter_config(directory)
    config = prefix_plus_config(raw, directory)
    tensors, _ = read_adapter_tensors(directory)
    return raw, config, split_site_tensors(config, tensors, directory)


def raw_site_prefixes(config: PrefixPlusConfig, sites: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The raw prefix of every site, running each site's MLP once in float32 where the adapter has one.

    This is the computation of `PrefixPlusModel.merge_mlp`, so the results are identical to an in-memory merge.

    Args:
        config ([`PrefixPlusConfig`]): The adapter's config.
        sites (`dict`): The adapter's tensors by site, from `split_site_tensors`.

    Example:

    ```py
    >>> raw_site_prefixes(config, sites)["self"].shape
    torch.Size([2, 2, 2, 8, 8])
    ```
    """
    if not config.prefix_projection:
        return {site: tensors["prefix"] for site, tensors in sites.items()}
    layouts = site_layouts(config)
    result = {}
    for site, tensors in sites.items():
        shape = layouts[site]["shape"]
        out_features = shape[0] * 2 * shape[2] * shape[4]
        hidden = config.mlp_hidden_size or config.token_dim
        mlp = build_mlp(config.token_dim, hidden, config.mlp_depth, config.mlp_activation, out_features)
        mlp.load_state_dict({name[len("mlp.") :]: t for name, t in tensors.items() if name.startswith("mlp.")})
        dtype = tensors[f"mlp.{2 * config.mlp_depth}.weight"].dtype
        result[site] = project_in_float32(tensors["embedding.weight"], mlp, shape, dtype)
    return result


def directory_size(directory: PathLike) -> int:
    """Total size in bytes of the files under ``directory``.

    Example:

    ```py
    >>> directory_size("my-adapter")
    10584
    ```
    """
    return sum(path.stat().st_size for path in Path(directory).rglob("*") if path.is_file())


# ---------------------------------------------------------------------------------------------------- writing
def check_destination(dst: PathLike, overwrite: bool, sources: tuple[PathLike, ...] = ()) -> Path:
    """Refuse a destination that exists (unless ``overwrite``), is not a directory, or is or lies in a source.

    Example:

    ```py
    >>> check_destination("merged", overwrite=False, sources=("my-adapter",))
    ```
    """
    dst = Path(dst)
    resolved = dst.resolve()
    for src in sources:
        src_resolved = Path(src).resolve()
        if resolved == src_resolved or src_resolved in resolved.parents:
            raise AdapterFileError(f"The destination {dst} is or lies inside the source {src}; choose another one.")
    if dst.exists() or dst.is_symlink():
        if not dst.is_dir() or dst.is_symlink():
            raise AdapterFileError(f"The destination {dst} exists and is not a directory.")
        if not overwrite:
            raise AdapterFileError(f"The destination {dst} exists; pass --overwrite (overwrite=True) to replace it.")
    return dst


@contextlib.contextmanager
def atomic_directory(dst: PathLike, overwrite: bool = False, sources: tuple[PathLike, ...] = ()) -> Iterator[Path]:
    """Write a directory atomically: yield a temporary directory beside ``dst``, renamed to ``dst`` on success.

    On any error the temporary directory is removed and ``dst`` is left as it was (absent, or the previous one).
    An existing ``dst`` is replaced only with ``overwrite=True``.

    Args:
        dst (`str` or `os.PathLike`): The directory to create.
        overwrite (`bool`): Replace an existing ``dst``.
        sources (`tuple`): Directories that must not be written to (``dst`` may not be or lie in one).

    Example:

    ```py
    >>> with atomic_directory("merged") as tmp:
    ...     (tmp / "adapter_config.json").write_text("{}")
    ```
    """
    dst = check_destination(dst, overwrite, sources)
    parent = dst.absolute().parent
    created = [p for p in (parent, *parent.parents) if not p.exists()]
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", suffix=".tmp", dir=parent))
    try:
        yield tmp
        check_destination(dst, overwrite, sources)
        if dst.exists():
            backup = tmp.with_suffix(".old")
            os.rename(dst, backup)
            try:
                os.rename(tmp, dst)
            except BaseException:
                os.rename(backup, dst)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for directory in created:  # the parents this call created, innermost first
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise


def _write_adapter(directory: Path, config: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Write a config (a `PeftConfig`, as `save_pretrained` does) and safetensors weights into ``directory``."""
    config.save_pretrained(str(directory))
    save_file(
        {key: t.contiguous() for key, t in tensors.items()}, str(directory / WEIGHTS_NAME), metadata={"format": "pt"}
    )


# ---------------------------------------------------------------------------------------------------- commands
def merge_adapter(src: PathLike, dst: PathLike, overwrite: bool = False) -> Path:
    """Merge the MLP of a saved PrefixPlus adapter into raw prefixes, using only its files.

    Gives the same tensors as `peft_model.merge_mlp()` followed by `save_pretrained`, without the base model. An
    adapter that is already raw is copied unchanged, with a warning. Other files of ``src`` are copied (the model
    card's generated section is refreshed to show the merge); Trainer checkpoint state (optimizer, scheduler, ...)
    is not, as it refers to the MLP.

    Args:
        src (`str` or `os.PathLike`): A saved PrefixPlus adapter.
        dst (`str` or `os.PathLike`): Where to write the merged adapter (written atomically).
        overwrite (`bool`): Replace an existing ``dst``.

    Returns:
        `Path`: ``dst``.

    Example:

    ```py
    >>> from peft_prefix_plus import merge_adapter
    >>> merge_adapter("checkpoints/best", "adapters/merged")
    ```
    """
    check_destination(dst, overwrite, (src,))
    raw, config, sites = load_prefix_plus_adapter(src)
    if config.prefix_projection:
        prefixes = raw_site_prefixes(config, sites)
        mark_config_merged(config)
    else:
        warnings.warn(
            f"{src} already holds raw prefixes (prefix_projection=False): there is no MLP to merge; "
            "it is copied unchanged.",
            UserWarning,
            stacklevel=2,
        )
        prefixes = {site: tensors["prefix"] for site, tensors in sites.items()}
    tensors = {f"{KEY_PREFIX}{site}.prefix": prefix for site, prefix in prefixes.items()}
    with atomic_directory(dst, overwrite, (src,)) as tmp:
        for path in Path(src).iterdir():
            skip = path.name in (CONFIG_NAME, WEIGHTS_NAME, *TRAINING_STATE_FILES) or path.name.startswith("rng_state")
            if path.is_file() and not skip:
                shutil.copy2(path, tmp / path.name)
        _write_adapter(tmp, config, tensors)
        if (tmp / "README.md").is_file():  # refresh the generated section of the copied model card
            from .card import summaries_from_dir, write_card

            write_card(tmp, summaries_from_dir(tmp), adapter_id=str(dst))
    return Path(dst)


def inspect_adapter(directory: PathLike) -> dict[str, Any]:
    """Describe a saved PrefixPlus adapter: sites, MLP shape or raw, merge record, parameter count, size on disk.

    The tensors are validated against the config, so a corrupt adapter raises `AdapterFileError`.

    Args:
        directory (`str` or `os.PathLike`): A saved PrefixPlus adapter.

    Returns:
        `dict`: JSON-serialisable: ``peft_type``, ``task_type``, ``base_model_name_or_path``, ``sites`` (per site:
        ``num_virtual_tokens``, ``layers``, ``num_layers``, ``num_key_value_heads``, ``head_dim``,
        ``num_parameters``), ``mlp`` (the MLP shape, or ``"raw"``), ``merged``, ``merged_from``,
        ``num_parameters``, ``raw_prefix_parameters``, ``size_on_disk`` (bytes) and ``dtype``.

    Example:

    ```py
    >>> from peft_prefix_plus import inspect_adapter
    >>> inspect_adapter("adapters/merged")["mlp"]
    'raw'
    ```
    """
    raw, config, sites = load_prefix_plus_adapter(directory)
    layouts = site_layouts(config)
    site_info = {}
    for site, layout in layouts.items():
        info = {key: value for key, value in layout.items() if key != "shape"}
        info["num_parameters"] = sum(t.numel() for t in sites[site].values())
        site_info[site] = info
    dtypes = sorted({str(t.dtype).replace("torch.", "") for tensors in sites.values() for t in tensors.values()})
    raw_count = sum(
        layout["shape"][0] * 2 * layout["shape"][2] * layout["shape"][3] * layout["shape"][4]
        for layout in layouts.values()
    )
    return {
        "path": str(directory),
        "peft_type": raw["peft_type"],
        "task_type": raw.get("task_type"),
        "base_model_name_or_path": raw.get("base_model_name_or_path"),
        "sites": site_info,
        "mlp": config.mlp_shape or "raw",
        "merged": config.merged_from is not None,
        "merged_from": config.merged_from,
        "offset_position_ids": config.offset_position_ids,
        "num_parameters": sum(info["num_parameters"] for info in site_info.values()),
        "raw_prefix_parameters": raw_count,
        "dtype": dtypes[0] if len(dtypes) == 1 else dtypes,
        "size_on_disk": directory_size(directory),
    }


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable text for the result of `inspect_adapter`.

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
        source = info["merged_from"]
        shape = ", ".join(f"{key} {value}" for key, value in source.items())
        lines.append(f"  merged:          yes, from an MLP with {shape}")
    else:
        lines.append("  merged:          no")
    lines.append(f"  parameters:      {info['num_parameters']:,} (raw prefixes: {info['raw_prefix_parameters']:,})")
    lines.append(f"  dtype:           {info['dtype']}")
    lines.append(f"  size on disk:    {info['size_on_disk']:,} bytes")
    return "\n".join(lines)


def export_to_peft(src: PathLike, dst: PathLike, overwrite: bool = False) -> Path:
    """Write a saved PrefixPlus adapter as a stock PEFT `PREFIX_TUNING` adapter (``prefix_projection=False``).

    Plain `peft` loads the result onto the same base model, with the same outputs. An MLP is merged on the fly
    (``src`` is not changed). Stock PEFT can represent only a decoder-only model with one prefix on every layer and
    position ids offset by the prefix length; any other adapter is refused with an error naming the property.

    Args:
        src (`str` or `os.PathLike`): A saved PrefixPlus adapter.
        dst (`str` or `os.PathLike`): Where to write the stock adapter (written atomically).
        overwrite (`bool`): Replace an existing ``dst``.

    Returns:
        `Path`: ``dst``.

    Example:

    ```py
    >>> from peft_prefix_plus import export_to_peft
    >>> export_to_peft("adapters/merged", "adapters/stock")
    >>> # elsewhere, with plain PEFT: PeftModel.from_pretrained(base_model, "adapters/stock")
    ```
    """
    from peft import PrefixTuningConfig

    check_destination(dst, overwrite, (src,))
    raw, config, sites = load_prefix_plus_adapter(src)
    reasons = []
    extra_sites = sorted(set(config.site_shapes) - {"self"})
    if extra_sites:
        reasons.append(
            f"it is for an encoder-decoder model (sites {sorted(config.site_shapes)}); stock PEFT prefix tuning shares "
            "one prefix table between decoder self- and cross-attention and has no encoder prefix"
        )
    elif raw.get("task_type") != "CAUSAL_LM":
        reasons.append(
            f"task_type is {raw.get('task_type')!r}; only decoder-only (CAUSAL_LM) adapters can be exported"
        )
    layouts = site_layouts(config)
    if "self" in layouts and len(layouts["self"]["layers"]) != layouts["self"]["num_layers"]:
        reasons.append(
            f"layers_to_transform={config.layers_to_transform} covers only some of the "
            f"{layouts['self']['num_layers']} layers; stock PEFT puts a prefix on every layer"
        )
    if not config.offset_position_ids:
        reasons.append(
            "offset_position_ids=False; stock PEFT starts real tokens' positions at the prefix length "
            "(offset_position_ids=True)"
        )
    if not extra_sites and "self" not in layouts:
        reasons.append("num_virtual_tokens=0: the adapter has no prefix")
    if reasons:
        raise AdapterFileError(f"Cannot export {src} to stock PEFT: " + "; ".join(reasons) + ".")
    prefix = raw_site_prefixes(config, sites)["self"]
    layout = layouts["self"]
    heads, head_dim = layout["num_key_value_heads"], layout["head_dim"]
    stock = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=layout["num_virtual_tokens"],
        num_layers=layout["num_layers"],
        token_dim=heads * head_dim,
        num_attention_heads=heads,
        encoder_hidden_size=heads * head_dim,
        num_transformer_submodules=1,
        prefix_projection=False,
        inference_mode=True,
        base_model_name_or_path=raw.get("base_model_name_or_path"),
        revision=raw.get("revision"),
    )
    from .interop import site_tensor_to_stock

    with atomic_directory(dst, overwrite, (src,)) as tmp:
        _write_adapter(tmp, stock, {"prompt_embeddings": site_tensor_to_stock(prefix)})
    return Path(dst)


def import_from_peft(src: PathLike, dst: PathLike, overwrite: bool = False) -> Path:
    """Convert a saved stock PEFT prefix-tuning adapter into a raw PrefixPlus adapter with the same outputs.

    Works for adapters saved with or without a projection (stock PEFT saves the projection's output). The result
    has ``prefix_projection=False`` and ``offset_position_ids=True`` (stock PEFT's position convention) and can be
    loaded with ``is_trainable=True`` to keep training.

    Args:
        src (`str` or `os.PathLike`): A saved stock PEFT `PREFIX_TUNING` adapter of a decoder-only model.
        dst (`str` or `os.PathLike`): Where to write the PrefixPlus adapter (written atomically).
        overwrite (`bool`): Replace an existing ``dst``.

    Returns:
        `Path`: ``dst``.

    Example:

    ```py
    >>> import peft_prefix_plus
    >>> peft_prefix_plus.import_from_peft("stock-prefix-adapter", "prefix-plus-adapter")
    >>> model = PeftModel.from_pretrained(base_model, "prefix-plus-adapter", is_trainable=True)
    ```
    """
    from .interop import stock_to_site_tensor

    check_destination(dst, overwrite, (src,))
    raw = read_adapter_config(src)
    where = Path(src) / CONFIG_NAME
    if raw["peft_type"] != STOCK_PEFT_TYPE:
        raise AdapterFileError(f"{src} holds a {raw['peft_type']!r} adapter, not a stock {STOCK_PEFT_TYPE} one.")
    values = {}
    for key in ("num_virtual_tokens", "num_layers", "token_dim", "num_attention_heads"):
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise AdapterFileError(f"{where}: `{key}` must be a positive integer, got {value!r}.")
        values[key] = value
    if raw.get("num_transformer_submodules", 1) != 1:
        raise AdapterFileError(
            f"{where}: num_transformer_submodules={raw.get('num_transformer_submodules')} (an encoder-decoder "
            "model); only decoder-only stock adapters can be imported."
        )
    if values["token_dim"] % values["num_attention_heads"]:
        raise AdapterFileError(
            f"{where}: token_dim={values['token_dim']} is not a multiple of "
            f"num_attention_heads={values['num_attention_heads']}."
        )
    tensors, _ = read_adapter_tensors(src)
    if set(tensors) != {"prompt_embeddings"}:
        raise AdapterFileError(
            f"{Path(src) / WEIGHTS_NAME} should hold exactly one tensor, 'prompt_embeddings'; found {sorted(tensors)}."
        )
    heads, head_dim = values["num_attention_heads"], values["token_dim"] // values["num_attention_heads"]
    embeddings = tensors["prompt_embeddings"]
    expected = (values["num_virtual_tokens"], values["num_layers"] * 2 * values["token_dim"])
    if tuple(embeddings.shape) != expected:
        raise AdapterFileError(
            f"{Path(src) / WEIGHTS_NAME}: 'prompt_embeddings' has shape {tuple(embeddings.shape)}, but the config "
            f"({values['num_virtual_tokens']} virtual tokens, {values['num_layers']} layers x 2 x token_dim "
            f"{values['token_dim']}) calls for {expected}."
        )
    prefix = stock_to_site_tensor(embeddings, values["num_layers"], heads, head_dim)
    merged_from = None
    if raw.get("prefix_projection"):
        hidden = raw.get("encoder_hidden_size") or values["token_dim"]
        merged_from = {"depth": 1, "hidden_size": hidden, "activation": "tanh", "source": STOCK_PEFT_TYPE}
    config = PrefixPlusConfig(
        task_type=raw.get("task_type"),
        num_virtual_tokens=values["num_virtual_tokens"],
        prefix_projection=False,
        offset_position_ids=True,
        site_shapes={"self": {"num_layers": values["num_layers"], "num_key_value_heads": heads, "head_dim": head_dim}},
        merged_from=merged_from,
        base_model_name_or_path=raw.get("base_model_name_or_path"),
        revision=raw.get("revision"),
        inference_mode=True,
    )
    with atomic_directory(dst, overwrite, (src,)) as tmp:
        _write_adapter(tmp, config, {f"{KEY_PREFIX}self.prefix": prefix})
    return Path(dst)

"""The one validated reader of saved adapter directories.

Reading is done in an order that never trusts the input with memory or time: the config is parsed (deep nesting is
refused), the safetensors header is read (no tensor data), dtypes are checked, the number of tensors and values the
config calls for is computed by arithmetic and compared with what the file holds, and only then are the real
encoders built on the meta device to compare names and shapes exactly, and the tensors loaded.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME, WEIGHTS_NAME
from safetensors import safe_open
from torch import nn

from ..errors import AdapterFileError
from ..tuner.config import PEFT_TYPE_NAME, PrefixPlusConfig
from ..tuner.geometry import SiteGeometry, adapter_geometry, build_site_encoders, expected_counts
from ..tuner.layer import KEY_PREFIX, is_modules_to_save_key, tensor_mismatches

PathLike = Union[str, os.PathLike]

STOCK_PEFT_TYPE = "PREFIX_TUNING"
#: safetensors dtype names accepted in an adapter: floating point only.
FLOAT_DTYPES: dict[str, torch.dtype] = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}


@dataclass(frozen=True)
class TensorInfo:
    """What the safetensors header says about one tensor, read without loading its data.

    Args:
        dtype (`torch.dtype`): The tensor's dtype (floating point; others are refused when the header is read).
        shape (`tuple[int, ...]`): The tensor's shape.

    Example:

    ```py
    >>> TensorInfo(torch.float32, (8, 32)).numel
    256
    ```
    """

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        """Number of values."""
        return math.prod(self.shape)


#: The largest ``adapter_config.json`` read (1 MiB): a real one is a few kilobytes.
MAX_CONFIG_BYTES = 1 << 20


def read_config_dict(directory: PathLike) -> dict[str, Any]:
    """Read ``adapter_config.json`` of a saved adapter as a dict with a ``peft_type``.

    Args:
        directory (`str` or `os.PathLike`): The adapter directory.

    Raises:
        AdapterFileError: If the directory or file is missing, not JSON, nested absurdly deep, or has no `peft_type`.

    Example:

    ```py
    >>> read_config_dict("my-adapter")["peft_type"]
    'PREFIX_PLUS'
    ```
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterFileError(f"{directory} is not a directory holding a saved adapter.")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise AdapterFileError(f"{path} is missing: {directory} does not hold an adapter saved with save_pretrained.")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise AdapterFileError(
            f"{path} is {size} bytes; an adapter config is a few kilobytes (at most {MAX_CONFIG_BYTES} bytes are "
            "read). The file is corrupt or not an adapter config: restore the one saved with the adapter."
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except RecursionError as error:
        raise AdapterFileError(f"{path} is nested too deeply to be an adapter config; it is corrupt.") from error
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AdapterFileError(f"{path} is not valid JSON ({error}).") from error
    if not isinstance(config, dict) or not isinstance(config.get("peft_type"), str):
        raise AdapterFileError(f"{path} is not a PEFT adapter config: it has no `peft_type`.")
    return config


def read_tensor_header(directory: PathLike) -> dict[str, TensorInfo]:
    """Read the names, dtypes and shapes of the tensors of ``adapter_model.safetensors``, without their data.

    Args:
        directory (`str` or `os.PathLike`): The adapter directory.

    Raises:
        AdapterFileError: If the file is missing (only safetensors is supported), unreadable, or holds a tensor that
            is not floating point.

    Example:

    ```py
    >>> read_tensor_header("my-adapter")["base_model.model.prefix_plus_layer.prefix_plus_sites.self.prefix"].shape
    (2, 2, 2, 8, 8)
    ```
    """
    path = Path(directory) / SAFETENSORS_WEIGHTS_NAME
    if not path.is_file():
        if (Path(directory) / WEIGHTS_NAME).is_file():
            raise AdapterFileError(
                f"{Path(directory)} holds only {WEIGHTS_NAME}: only safetensors is supported (pickle files can run "
                f"code). Save the adapter again with save_pretrained(..., safe_serialization=True)."
            )
        raise AdapterFileError(f"{path} is missing: {directory} does not hold the weights of a saved adapter.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = {key: handle.get_slice(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
            header = {key: (piece.get_dtype(), tuple(piece.get_shape())) for key, piece in raw.items()}
    except Exception as error:  # safetensors raises its own error types, and OSError
        raise AdapterFileError(f"{path} cannot be read; is it truncated or corrupt? ({error})") from error
    bad = {key: dtype for key, (dtype, _) in header.items() if dtype not in FLOAT_DTYPES}
    if bad:
        key, dtype = next(iter(bad.items()))
        raise AdapterFileError(
            f"{path}: tensor {key!r} has dtype {dtype}; adapter tensors must be floating point "
            f"({', '.join(FLOAT_DTYPES)}). The file is corrupt or not an adapter ({len(bad)} such tensors)."
        )
    return {key: TensorInfo(FLOAT_DTYPES[dtype], shape) for key, (dtype, shape) in header.items()}


def load_tensors(directory: PathLike, keys: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Load the tensors ``keys`` of ``adapter_model.safetensors`` (validated by the caller) and the file's metadata.

    Args:
        directory (`str` or `os.PathLike`): The adapter directory.
        keys (`list[str]`): The tensors to load.

    Example:

    ```py
    >>> tensors, metadata = load_tensors("my-adapter", list(read_tensor_header("my-adapter")))
    ```
    """
    path = Path(directory) / SAFETENSORS_WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in keys}, dict(handle.metadata() or {})
    except Exception as error:
        raise AdapterFileError(f"{path} cannot be read; is it truncated or corrupt? ({error})") from error


def count_nonfinite(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """The number of NaN and infinite values of every tensor that has any.

    Args:
        tensors (`dict[str, torch.Tensor]`): Named tensors.

    Example:

    ```py
    >>> count_nonfinite({"a": torch.tensor([1.0, float("nan"), float("inf")])})
    {'a': 2}
    ```
    """
    counts = {key: int((~torch.isfinite(tensor)).sum()) for key, tensor in tensors.items()}
    return {key: count for key, count in counts.items() if count}


def require_finite(tensors: dict[str, torch.Tensor], where: PathLike, action: str) -> None:
    """Refuse tensors holding NaN or infinite values, naming each such tensor and the count.

    Args:
        tensors (`dict[str, torch.Tensor]`): Named tensors.
        where (`str` or `os.PathLike`): The file or directory they come from, for the message.
        action (`str`): What is refused, e.g. ``"merge"``.

    Example:

    ```py
    >>> require_finite(adapter.all_tensors(), "my-adapter", "merge")
    ```
    """
    bad = count_nonfinite(tensors)
    if bad:
        listing = "; ".join(f"{key}: {count} of {tensors[key].numel()}" for key, count in bad.items())
        raise AdapterFileError(
            f"Cannot {action} {where}: it holds non-finite values (NaN or Inf) in {listing}. The adapter is broken; "
            "use an earlier checkpoint."
        )


@dataclass
class PrefixPlusFiles:
    """A saved PrefixPlus adapter, read and validated by :func:`read_prefix_plus_adapter`.

    Args:
        directory (`Path`): The adapter directory.
        raw_config (`dict`): The content of ``adapter_config.json``.
        config ([`PrefixPlusConfig`]): The validated config.
        geometry (`dict[str, SiteGeometry]`): Per site, from :func:`peft_prefix_plus.tuner.geometry.adapter_geometry`.
        tensors (`dict[str, torch.Tensor]`): The PrefixPlus tensors keyed ``<site>.<parameter>``, as the encoders'
            ``state_dict()`` names them.
        extra_tensors (`dict[str, torch.Tensor]`): Other tensors (``modules_to_save``), keyed as in the file.
        metadata (`dict[str, str]`): The safetensors metadata.

    Example:

    ```py
    >>> adapter = read_prefix_plus_adapter("my-adapter")
    >>> adapter.dtype, sorted(adapter.geometry)
    (torch.float32, ['self'])
    ```
    """

    directory: Path
    raw_config: dict[str, Any]
    config: PrefixPlusConfig
    geometry: dict[str, SiteGeometry]
    tensors: dict[str, torch.Tensor]
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        """The one dtype of the PrefixPlus tensors."""
        return next(iter(self.tensors.values())).dtype if self.tensors else torch.float32

    def all_tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor keyed as in the file (PrefixPlus tensors with :data:`KEY_PREFIX`)."""
        return {KEY_PREFIX + name: tensor for name, tensor in self.tensors.items()} | self.extra_tensors

    def nonfinite(self) -> dict[str, int]:
        """NaN/Inf counts of every tensor that has any, keyed as in the file."""
        return count_nonfinite(self.all_tensors())

    def require_finite(self, action: str) -> None:
        """Refuse an adapter holding NaN or infinite values (see :func:`require_finite`).

        Args:
            action (`str`): What is refused, e.g. ``"merge"``.
        """
        require_finite(self.all_tensors(), self.directory, action)

    def site_encoders(self) -> nn.ModuleDict:
        """The adapter's real prefix encoders, holding its tensors (built on the meta device, loaded with
        ``assign=True``: no copy)."""
        encoders = build_site_encoders(self.config)
        encoders.load_state_dict(self.tensors, assign=True)
        return encoders


def _prefix_plus_config(raw: dict[str, Any], header: dict[str, TensorInfo], where: Path) -> PrefixPlusConfig:
    """Check the `peft_type` against the tensors and build the config with PEFT's own loader.

    Args:
        raw (`dict`): The content of ``adapter_config.json``.
        header (`dict[str, TensorInfo]`): The safetensors header.
        where (`Path`): The config file, for messages.

    Example:

    ```py
    >>> _prefix_plus_config(read_config_dict(d), read_tensor_header(d), d / CONFIG_NAME).mlp_depth
    1
    ```
    """
    peft_type = raw["peft_type"]
    if peft_type != PEFT_TYPE_NAME:
        if any(key.startswith(KEY_PREFIX) for key in header):
            raise AdapterFileError(
                f"{where} says peft_type {peft_type!r}, but {SAFETENSORS_WEIGHTS_NAME} holds PrefixPlus tensors: the "
                f'config was edited. Restore "peft_type": "{PEFT_TYPE_NAME}".'
            )
        hint = (
            " Use `import-peft` to convert a stock PEFT prefix-tuning adapter." if peft_type == STOCK_PEFT_TYPE else ""
        )
        raise AdapterFileError(f"{where.parent} holds a {peft_type!r} adapter, not a {PEFT_TYPE_NAME} one.{hint}")
    try:
        config = PrefixPlusConfig.from_peft_type(**raw)
    except (TypeError, ValueError, KeyError, RecursionError) as error:
        raise AdapterFileError(f"{where} is not a valid PrefixPlus config: {error}") from error
    return config


def _check_kind(config: PrefixPlusConfig, names: list[str], where: Path) -> None:
    """Refuse a config whose projection setting or MLP depth differs from the file's tensors, saying which.

    Args:
        config ([`PrefixPlusConfig`]): The config.
        names (`list[str]`): The PrefixPlus tensor names in the file, ``<site>.<parameter>``.
        where (`Path`): The config file, for messages.

    Example:

    ```py
    >>> _check_kind(config, ["self.prefix"], path)  # raises when config.prefix_projection is True
    ```
    """
    file_raw = any(name.endswith(".prefix") for name in names)
    file_mlp = any(".mlp." in f".{name}" or name.endswith(".embedding.weight") for name in names)
    if file_mlp and not config.prefix_projection:
        raise AdapterFileError(
            f"{where}: prefix_projection is false, but the file holds MLP tensors (embedding and mlp); the config "
            "does not match the weights. Restore prefix_projection: true, or merge the MLP with `prefix-plus merge`."
        )
    if file_raw and config.prefix_projection:
        raise AdapterFileError(
            f"{where}: prefix_projection is true, but the file holds raw prefixes and no MLP; the config does not "
            "match the weights. Restore prefix_projection: false."
        )
    if file_mlp:
        sites = {name.split(".", 1)[0] for name in names}
        layers = {name for name in names if ".mlp." in f".{name}" and name.endswith(".weight")}
        depth = len(layers) // max(len(sites), 1) - 1
        if depth != config.mlp_depth:
            raise AdapterFileError(
                f"{where}: mlp_depth is {config.mlp_depth}, but the file holds an MLP of depth {depth}; the config "
                f"does not match the weights. Restore mlp_depth: {depth}."
            )


def _check_shapes(config: PrefixPlusConfig, geometry: dict, header: dict[str, TensorInfo], where: Path) -> None:
    """Compare the config's tensors with the file's: counts by arithmetic first, then names and shapes exactly.

    Args:
        config ([`PrefixPlusConfig`]): The config.
        geometry (`dict`): From `adapter_geometry(config)`.
        header (`dict[str, TensorInfo]`): The safetensors header.
        where (`Path`): The config file, for messages.

    Example:

    ```py
    >>> _check_shapes(config, adapter_geometry(config), read_tensor_header(d), d / CONFIG_NAME)
    ```
    """
    held = {key[len(KEY_PREFIX) :]: info for key, info in header.items() if key.startswith(KEY_PREFIX)}
    _check_kind(config, list(held), where)
    want_tensors, want_values = expected_counts(config, geometry)
    have_values = sum(info.numel for info in held.values())
    if want_tensors != len(held) or want_values > have_values:
        raise AdapterFileError(
            f"{where} calls for {want_tensors} PrefixPlus tensors with {want_values:,} values, but "
            f"{SAFETENSORS_WEIGHTS_NAME} holds {len(held)} tensors with {have_values:,} values: the config does not "
            "match the weights (edited or corrupt)."
        )
    expected = {name: tuple(t.shape) for name, t in build_site_encoders(config).state_dict().items()}
    problems = tensor_mismatches(expected, {name: tuple(info.shape) for name, info in held.items()})
    if problems:
        raise AdapterFileError(
            f"{SAFETENSORS_WEIGHTS_NAME} does not match {where} (sites {sorted(geometry)}): {'; '.join(problems)}. "
            "The config does not match the weights (edited or corrupt)."
        )


def check_prefix_plus_adapter(
    directory: PathLike,
) -> tuple[dict[str, Any], dict[str, TensorInfo], PrefixPlusConfig, dict]:
    """Validate a saved PrefixPlus adapter from its config and the safetensors header alone, reading no tensor data.

    The checks of `read_prefix_plus_adapter` before it loads the tensors: the config (size, PEFT's loader and
    `PrefixPlusConfig.__post_init__`, a `peft_type` that contradicts the tensors), the dtypes, the number of tensors
    and values against the config (by arithmetic, so an absurd config is refused at once), every name and shape, and
    no tensor that is neither a PrefixPlus tensor nor a declared ``modules_to_save`` copy. `PeftModel.from_pretrained`
    runs it through `PrefixPlusConfig.from_pretrained` before it builds anything.

    Args:
        directory (`str` or `os.PathLike`): The adapter directory.

    Returns:
        `tuple`: The raw config dict, the header, the `PrefixPlusConfig` and the adapter geometry.

    Raises:
        AdapterFileError: Naming the problem.

    Example:

    ```py
    >>> raw, header, config, geometry = check_prefix_plus_adapter("my-adapter")
    >>> config.num_virtual_tokens
    8
    ```
    """
    directory = Path(directory)
    raw = read_config_dict(directory)
    header = read_tensor_header(directory)
    where = directory / CONFIG_NAME
    config = _prefix_plus_config(raw, header, where)
    try:
        geometry = adapter_geometry(config)
    except ValueError as error:
        raise AdapterFileError(f"{where}: {error}") from error
    extra = [key for key in header if not key.startswith(KEY_PREFIX)]
    unexpected = [key for key in extra if not is_modules_to_save_key(key, raw.get("modules_to_save"))]
    if unexpected:
        raise AdapterFileError(
            f"{directory / SAFETENSORS_WEIGHTS_NAME} holds tensors that are neither PrefixPlus tensors nor "
            f"modules_to_save: {unexpected[:5]}. Loading them would overwrite the base model's weights; remove them "
            "from the file, or declare their modules in `modules_to_save`."
        )
    dtypes = sorted({str(info.dtype) for key, info in header.items() if key.startswith(KEY_PREFIX)})
    if len(dtypes) > 1:
        raise AdapterFileError(
            f"{directory / SAFETENSORS_WEIGHTS_NAME} mixes dtypes {dtypes}; one adapter must use one dtype. The file "
            "is corrupt or was edited."
        )
    _check_shapes(config, geometry, header, where)
    return raw, header, config, geometry


def read_prefix_plus_adapter(directory: PathLike) -> PrefixPlusFiles:
    """Read and validate a saved PrefixPlus adapter; the one entry point every file tool uses.

    Validates, in this order and before loading any tensor data: the config (PEFT's loader and
    `PrefixPlusConfig.__post_init__`; a `peft_type` that contradicts the tensors), the dtypes (floating point only,
    one dtype for the PrefixPlus tensors), the number of tensors and values the config calls for against those the
    file holds (by arithmetic, so an absurd config is refused at once), and every name and shape exactly against the
    real encoders built on the meta device. Tensors PEFT saves for ``modules_to_save`` are accepted and kept.
    Non-finite values are not refused here: see `PrefixPlusFiles.require_finite` and `PrefixPlusFiles.nonfinite`.

    Args:
        directory (`str` or `os.PathLike`): The adapter directory.

    Raises:
        AdapterFileError: Naming the problem.

    Example:

    ```py
    >>> adapter = read_prefix_plus_adapter("my-adapter")
    >>> adapter.site_encoders()["self"].project().shape
    torch.Size([2, 2, 2, 8, 8])
    ```
    """
    directory = Path(directory)
    raw, header, config, geometry = check_prefix_plus_adapter(directory)
    loaded, metadata = load_tensors(directory, list(header))
    tensors = {key[len(KEY_PREFIX) :]: t for key, t in loaded.items() if key.startswith(KEY_PREFIX)}
    extras = {key: t for key, t in loaded.items() if not key.startswith(KEY_PREFIX)}
    return PrefixPlusFiles(directory, raw, config, geometry, tensors, extras, metadata)

"""Converting between PrefixPlus and stock PEFT prefix tuning: saved adapters both ways, and prefix values in memory.

Stock PEFT stores a prefix as ``prompt_embeddings`` of shape ``(num_virtual_tokens, num_layers * 2 * kv_heads *
head_dim)``, each row laid out as ``(layer, key/value, head, head_dim)``. PrefixPlus stores it per site as
``(num_layers, 2, kv_heads, num_virtual_tokens, head_dim)``. The conversions change no value.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import torch
from peft import PrefixTuningConfig
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from torch import nn

from ..errors import AdapterFileError, PrefixPlusValueError, UnsupportedError
from ..tuner.config import PrefixPlusConfig
from ..tuner.layer import PrefixSiteEncoder, site_layout
from ..tuner.model import PrefixPlusModel
from .merge_mlp import merged_prefixes
from .read import (
    KEY_PREFIX,
    STOCK_PEFT_TYPE,
    PrefixPlusFiles,
    load_tensors,
    read_config_dict,
    read_prefix_plus_adapter,
    read_tensor_header,
    require_finite,
)
from .write import atomic_directory, check_destination, write_adapter_files

PathLike = Union[str, os.PathLike]
#: Where PEFT saves ``modules_to_save`` tensors: under the tuner (PrefixPlus) or the model itself (prompt learning).
TUNER_KEY_PREFIX = "base_model.model."
STOCK_KEY_PREFIX = "base_model."


def stock_to_site_tensor(
    prompt_embeddings: torch.Tensor, num_layers: int, num_key_value_heads: int, head_dim: int
) -> torch.Tensor:
    """Convert stock PEFT ``prompt_embeddings`` to a PrefixPlus site tensor.

    Args:
        prompt_embeddings (`torch.Tensor`): Shape ``(num_virtual_tokens, num_layers * 2 * kv_heads * head_dim)``.
        num_layers (`int`): Number of layers.
        num_key_value_heads (`int`): Key/value heads per layer.
        head_dim (`int`): Head dimension.

    Returns:
        `torch.Tensor`: Shape ``(num_layers, 2, kv_heads, num_virtual_tokens, head_dim)``, contiguous.

    Example:

    ```py
    >>> stock_to_site_tensor(torch.zeros(20, 4 * 2 * 2 * 16), 4, 2, 16).shape
    torch.Size([4, 2, 2, 20, 16])
    ```
    """
    expected = num_layers * 2 * num_key_value_heads * head_dim
    if prompt_embeddings.dim() != 2 or prompt_embeddings.shape[1] != expected:
        raise PrefixPlusValueError(
            f"Stock prefix of shape {tuple(prompt_embeddings.shape)} does not fit {num_layers} layers x 2 x "
            f"{num_key_value_heads} key/value heads x {head_dim} head_dim (expected (num_virtual_tokens, {expected}))."
        )
    shape = (num_layers, 2, num_key_value_heads, prompt_embeddings.shape[0], head_dim)
    return site_layout(prompt_embeddings, shape).contiguous()


def site_tensor_to_stock(prefix: torch.Tensor) -> torch.Tensor:
    """Convert a PrefixPlus site tensor ``(layers, 2, kv_heads, length, head_dim)`` to stock ``prompt_embeddings``.

    Args:
        prefix (`torch.Tensor`): A PrefixPlus site tensor.

    Returns:
        `torch.Tensor`: Shape ``(length, layers * 2 * kv_heads * head_dim)``, contiguous.

    Example:

    ```py
    >>> site_tensor_to_stock(torch.zeros(4, 2, 2, 20, 16)).shape
    torch.Size([20, 256])
    ```
    """
    if prefix.dim() != 5 or prefix.shape[1] != 2:
        raise PrefixPlusValueError(
            f"A PrefixPlus site tensor has shape (layers, 2, kv_heads, length, head_dim), got {tuple(prefix.shape)}."
        )
    layers, _, heads, length, head_dim = prefix.shape
    return prefix.permute(3, 0, 1, 2, 4).reshape(length, layers * 2 * heads * head_dim).contiguous()


def copy_stock_prefix(stock_model: nn.Module, model: nn.Module, adapter_name: str = "default") -> None:
    """Give the raw PrefixPlus adapter ``adapter_name`` of ``model`` the prefix values of a stock PEFT model.

    The stock model may use a projection; its MLP output is what gets copied. With the same base model and
    ``offset_position_ids=True``, both models then give the same outputs.

    Args:
        stock_model ([`~peft.PeftModel`]): A model with a stock PEFT `PrefixTuningConfig` adapter named `adapter_name`.
        model ([`~peft.PeftModel`]): A model with a raw (``prefix_projection=False``) PrefixPlus adapter of the same
            length on every layer of a decoder-only model.
        adapter_name (`str`): The adapter name in both models.

    Example:

    ```py
    >>> copy_stock_prefix(stock_peft_model, prefix_plus_model)
    ```
    """
    encoder = _self_site_encoder(model, adapter_name)
    if encoder.is_row_layout:
        raise UnsupportedError(
            "The PrefixPlus adapter's layers differ in key/value shape (or keys are wider than values), which stock "
            "PEFT prefix tuning cannot represent: there is no stock prefix to copy for this model."
        )
    if encoder.is_projected:
        raise PrefixPlusValueError(
            "The PrefixPlus adapter uses an MLP (prefix_projection=True); copy into a raw adapter "
            "(prefix_projection=False) or call merge_mlp() first."
        )
    with torch.no_grad():
        stock = stock_model.get_prompt_embedding_to_save(adapter_name)
        layers, _, heads, length, head_dim = encoder.shape
        if stock.shape[0] != length:
            raise PrefixPlusValueError(
                f"The stock prefix has {stock.shape[0]} virtual tokens, the PrefixPlus one {length}."
            )
        encoder.prefix.copy_(stock_to_site_tensor(stock, layers, heads, head_dim))


def _self_site_encoder(model: nn.Module, adapter_name: str) -> PrefixSiteEncoder:
    """The raw self-attention encoder of ``adapter_name`` in a PrefixPlus `PeftModel`, covering every layer.

    Args:
        model (`nn.Module`): A `PeftModel` with a PrefixPlus adapter.
        adapter_name (`str`): The adapter.

    Example:

    ```py
    >>> _self_site_encoder(peft_model, "default").shape
    (2, 2, 2, 4, 8)
    ```
    """
    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, PrefixPlusModel):
        raise PrefixPlusValueError(f"Expected a PeftModel with a PrefixPlus adapter, got {type(model).__name__}.")
    sites = tuner._layer.prefix_plus_sites
    if adapter_name not in sites or "self" not in sites[adapter_name]:
        raise PrefixPlusValueError(
            f"The PrefixPlus model has no adapter {adapter_name!r} with a self-attention prefix."
        )
    encoder = sites[adapter_name]["self"]
    if len(encoder.slots) != tuner.peft_config[adapter_name].site_shapes["self"]["num_layers"]:
        raise PrefixPlusValueError(
            "Stock PEFT prefixes cover every layer; the PrefixPlus adapter uses `layers_to_transform`."
        )
    return encoder


def export_refusals(adapter: PrefixPlusFiles) -> list[str]:
    """Why a saved PrefixPlus adapter cannot be written as a stock PEFT adapter (empty when it can).

    Stock PEFT prefix tuning represents only a decoder-only model with one prefix on every layer and real tokens'
    positions offset by the prefix length.

    Args:
        adapter ([`PrefixPlusFiles`]): A read adapter.

    Example:

    ```py
    >>> export_refusals(read_prefix_plus_adapter("t5-adapter"))
    ['it is for an encoder-decoder model (sites [...]) ...']
    ```
    """
    config, geometry = adapter.config, adapter.geometry
    reasons = []
    if set(config.site_shapes) - {"self"}:
        reasons.append(
            f"it is for an encoder-decoder model (sites {sorted(config.site_shapes)}); stock PEFT prefix tuning shares "
            "one prefix table between decoder self- and cross-attention and has no encoder prefix"
        )
    elif adapter.raw_config.get("task_type") != "CAUSAL_LM":
        reasons.append(
            f"task_type is {adapter.raw_config.get('task_type')!r}; only decoder-only (CAUSAL_LM) adapters can be "
            "exported"
        )
    if "self" in geometry and not geometry["self"].covers_all_layers:
        reasons.append(
            f"layers_to_transform={config.layers_to_transform} covers only some of the {geometry['self'].num_layers} "
            "layers; stock PEFT puts a prefix on every layer"
        )
    if "self" in geometry and geometry["self"].per_layer:
        reasons.append(
            "its layers differ in key/value heads or head dimension, or keys are wider than values (per layer: "
            f"{sorted(set(geometry['self'].transformed_layer_shapes))} as [heads, key dim, value dim]); stock PEFT "
            "has one shape for every layer's keys and values"
        )
    if not config.offset_position_ids:
        reasons.append(
            "offset_position_ids=False; stock PEFT starts real tokens' positions at the prefix length "
            "(offset_position_ids=True)"
        )
    if "self" not in geometry and not set(config.site_shapes) - {"self"}:
        reasons.append("num_virtual_tokens=0: the adapter has no prefix")
    return reasons


def export_to_peft(src: PathLike, dst: PathLike, overwrite: bool = False) -> Path:
    """Write a saved PrefixPlus adapter as a stock PEFT `PREFIX_TUNING` adapter (``prefix_projection=False``).

    Plain `peft` loads the result onto the same base model, with the same outputs. An MLP is merged on the fly by the
    in-memory merge function (``src`` is not changed). Stock PEFT can represent only a decoder-only model with one
    prefix on every layer and position ids offset by the prefix length; any other adapter is refused with an error
    naming the property. An adapter holding NaN or infinite values is refused. ``dst`` is written atomically.

    Args:
        src (`str` or `os.PathLike`): A saved PrefixPlus adapter.
        dst (`str` or `os.PathLike`): Where to write the stock adapter.
        overwrite (`bool`): Replace an existing ``dst`` (only an adapter directory or an empty one).

    Returns:
        `Path`: ``dst``.

    Example:

    ```py
    >>> from peft_prefix_plus import export_to_peft
    >>> export_to_peft("adapters/merged", "adapters/stock")
    >>> # elsewhere, with plain PEFT: PeftModel.from_pretrained(base_model, "adapters/stock")
    ```
    """
    check_destination(dst, overwrite=overwrite, sources=(src,))
    adapter = read_prefix_plus_adapter(src)
    reasons = export_refusals(adapter)
    if reasons:
        raise AdapterFileError(f"Cannot export {src} to stock PEFT: " + "; ".join(reasons) + ".")
    prefix = merged_prefixes(adapter, "export")[0]["self.prefix"]
    geometry = adapter.geometry["self"]
    heads, head_dim = geometry.num_key_value_heads, geometry.head_dim
    stock = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=geometry.num_virtual_tokens,
        num_layers=geometry.num_layers,
        token_dim=heads * head_dim,
        num_attention_heads=heads,
        encoder_hidden_size=heads * head_dim,
        num_transformer_submodules=1,
        prefix_projection=False,
        inference_mode=True,
        modules_to_save=adapter.raw_config.get("modules_to_save") if adapter.extra_tensors else None,
        base_model_name_or_path=adapter.raw_config.get("base_model_name_or_path"),
        revision=adapter.raw_config.get("revision"),
    )
    # a tuner's saved keys start with base_model.model., a prompt-learning model's with base_model.
    extras = {
        key.replace(TUNER_KEY_PREFIX, STOCK_KEY_PREFIX, 1) if key.startswith(TUNER_KEY_PREFIX) else key: tensor
        for key, tensor in adapter.extra_tensors.items()
    }
    with atomic_directory(dst, overwrite=overwrite, sources=(src,)) as tmp:
        write_adapter_files(tmp, stock, {"prompt_embeddings": site_tensor_to_stock(prefix)} | extras)
    return Path(dst)


def _stock_geometry(raw: dict[str, Any], where: Path) -> dict[str, int]:
    """Validate the sizes of a stock prefix-tuning config: positive integers, one decoder, divisible widths.

    Args:
        raw (`dict`): The content of the stock ``adapter_config.json``.
        where (`Path`): The config file, for messages.

    Example:

    ```py
    >>> _stock_geometry(read_config_dict("stock"), Path("stock/adapter_config.json"))["num_layers"]
    2
    ```
    """
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
    return values


def import_from_peft(src: PathLike, dst: PathLike, overwrite: bool = False) -> Path:
    """Convert a saved stock PEFT prefix-tuning adapter into a raw PrefixPlus adapter with the same outputs.

    Works for adapters saved with or without a projection (stock PEFT saves the projection's output). The result
    has ``prefix_projection=False`` and ``offset_position_ids=True`` (stock PEFT's position convention) and can be
    loaded with ``is_trainable=True`` to keep training. The source is validated as any adapter is (dtypes, sizes
    against the file before loading, finiteness); ``dst`` is written atomically.

    Args:
        src (`str` or `os.PathLike`): A saved stock PEFT `PREFIX_TUNING` adapter of a decoder-only model.
        dst (`str` or `os.PathLike`): Where to write the PrefixPlus adapter.
        overwrite (`bool`): Replace an existing ``dst`` (only an adapter directory or an empty one).

    Returns:
        `Path`: ``dst``.

    Example:

    ```py
    >>> import peft_prefix_plus
    >>> peft_prefix_plus.import_from_peft("stock-prefix-adapter", "prefix-plus-adapter")
    >>> model = PeftModel.from_pretrained(base_model, "prefix-plus-adapter", is_trainable=True)
    ```
    """
    check_destination(dst, overwrite=overwrite, sources=(src,))
    raw = read_config_dict(src)
    where = Path(src) / CONFIG_NAME
    if raw["peft_type"] != STOCK_PEFT_TYPE:
        raise AdapterFileError(f"{src} holds a {raw['peft_type']!r} adapter, not a stock {STOCK_PEFT_TYPE} one.")
    values = _stock_geometry(raw, where)
    header = read_tensor_header(src)
    weights = Path(src) / SAFETENSORS_WEIGHTS_NAME
    if set(header) != {"prompt_embeddings"}:
        raise AdapterFileError(
            f"{weights} should hold exactly one tensor, 'prompt_embeddings'; found {sorted(header)}."
        )
    expected = (values["num_virtual_tokens"], values["num_layers"] * 2 * values["token_dim"])
    if header["prompt_embeddings"].shape != expected:
        raise AdapterFileError(
            f"{weights}: 'prompt_embeddings' has shape {header['prompt_embeddings'].shape}, but the config "
            f"({values['num_virtual_tokens']} virtual tokens, {values['num_layers']} layers x 2 x token_dim "
            f"{values['token_dim']}) calls for {expected}."
        )
    tensors, _ = load_tensors(src, ["prompt_embeddings"])
    require_finite(tensors, src, "import")
    heads = values["num_attention_heads"]
    head_dim = values["token_dim"] // heads
    prefix = stock_to_site_tensor(tensors["prompt_embeddings"], values["num_layers"], heads, head_dim)
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
    with atomic_directory(dst, overwrite=overwrite, sources=(src,)) as tmp:
        write_adapter_files(tmp, config, {f"{KEY_PREFIX}self.prefix": prefix})
    return Path(dst)

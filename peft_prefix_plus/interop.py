"""Moving prefix values between stock PEFT prefix tuning and PrefixPlus.

Stock PEFT stores a prefix as ``prompt_embeddings`` of shape ``(num_virtual_tokens, num_layers * 2 * kv_heads *
head_dim)``, each row laid out as ``(layer, key/value, head, head_dim)``. PrefixPlus stores it per site as
``(num_layers, 2, kv_heads, num_virtual_tokens, head_dim)``. The two functions below convert between the layouts
without changing a value; :func:`copy_stock_prefix` uses them to give a PrefixPlus adapter the exact prefix of a
stock PEFT adapter.
"""

from __future__ import annotations

import torch
from torch import nn

from .layer import PrefixSiteEncoder, site_layout


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
        raise ValueError(
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
        raise ValueError(
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
    if encoder.is_projected:
        raise ValueError(
            "The PrefixPlus adapter uses an MLP (prefix_projection=True); copy into a raw adapter "
            "(prefix_projection=False) or call merge_mlp() first."
        )
    with torch.no_grad():
        stock = stock_model.get_prompt_embedding_to_save(adapter_name)
        layers, _, heads, length, head_dim = encoder.shape
        if stock.shape[0] != length:
            raise ValueError(f"The stock prefix has {stock.shape[0]} virtual tokens, the PrefixPlus one {length}.")
        encoder.prefix.copy_(stock_to_site_tensor(stock, layers, heads, head_dim))


def _self_site_encoder(model: nn.Module, adapter_name: str) -> PrefixSiteEncoder:
    from .model import PrefixPlusModel

    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, PrefixPlusModel):
        raise ValueError(f"Expected a PeftModel with a PrefixPlus adapter, got {type(model).__name__}.")
    sites = tuner._layer.prefix_plus_sites
    if adapter_name not in sites or "self" not in sites[adapter_name]:
        raise ValueError(f"The PrefixPlus model has no adapter {adapter_name!r} with a self-attention prefix.")
    encoder = sites[adapter_name]["self"]
    if len(encoder.slots) != tuner.peft_config[adapter_name].site_shapes["self"]["num_layers"]:
        raise ValueError("Stock PEFT prefixes cover every layer; the PrefixPlus adapter uses `layers_to_transform`.")
    return encoder

"""Merging the prefix MLP into raw prefixes, in memory.

The MLP of a PrefixPlus adapter is a training device: once training is done only its output matters. Merging runs
the MLP once, in float32 whatever the model's dtype, and replaces the embedding and MLP of every site by the raw
prefix parameters they produce. The merged adapter gives the same outputs, is as small as a prefix can be, skips
the MLP in the forward pass, and can be trained further as a raw prefix.

The same function (:func:`merge_site_encoders`) serves the on-disk merge of
:func:`peft_prefix_plus.files.merge_mlp_files`, which loads a saved adapter into the real encoders: both give
identical tensors by construction.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Optional

import torch
from torch import nn

from .config import PrefixPlusConfig
from .layer import PrefixSiteEncoder, site_layout


@torch.no_grad()
def project_in_float32(
    embedding: torch.Tensor,
    mlp: nn.Sequential,
    shape: tuple[int, int, int, int, int],
    dtype: torch.dtype,
    offset: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Run a prefix MLP once in float32 and return the raw prefix in the site layout, cast to ``dtype``.

    ``mlp`` is converted to float32 in place: pass a copy if the original must keep its dtype.

    Args:
        embedding (`torch.Tensor`): The prefix embedding, shape ``(num_virtual_tokens, token_dim)``.
        mlp (`nn.Sequential`): The prefix MLP (see `peft_prefix_plus.tuner.layer.build_mlp`).
        shape (`tuple`): The site shape ``(num_layers, 2, num_key_value_heads, num_virtual_tokens, head_dim)``.
        dtype (`torch.dtype`): The dtype of the result (the dtype of the adapter's parameters).
        offset (`torch.Tensor`, *optional*): A fixed prefix the MLP's output is added to (text initialisation's
            `prefix_init`), in the site layout.

    Returns:
        `torch.Tensor`: The raw prefix of shape ``shape``, contiguous.

    Example:

    ```py
    >>> raw = project_in_float32(encoder.embedding.weight, copy.deepcopy(encoder.mlp), encoder.shape, torch.float32)
    ```
    """
    # fresh, aligned memory: loaded (memory-mapped) tensors could otherwise take another matmul path
    out = site_layout(mlp.float()(embedding.to(torch.float32, copy=True)), shape)
    if offset is not None:
        out = out + offset.to(device=out.device, dtype=torch.float32)
    return out.contiguous().to(dtype)


def merge_site_encoder(encoder: PrefixSiteEncoder) -> bool:
    """Replace the embedding and MLP of one site encoder by the raw prefix they produce, and free the MLP.

    The raw prefix keeps the dtype, device and trainability of the MLP's parameters.

    Args:
        encoder ([`PrefixSiteEncoder`]): The encoder to merge.

    Returns:
        `bool`: `True` if the encoder was merged, `False` if it already held a raw prefix.

    Example:

    ```py
    >>> merge_site_encoder(peft_model.base_model.model.prefix_plus_layer.prefix_plus_sites["default"]["self"])
    True
    ```
    """
    if not encoder.is_projected:
        return False
    last = encoder.mlp[-1].weight
    offset = getattr(encoder, "prefix_init", None)
    raw = project_in_float32(encoder.embedding.weight, copy.deepcopy(encoder.mlp), encoder.shape, last.dtype, offset)
    requires_grad = last.requires_grad
    del encoder.mlp, encoder.embedding
    if offset is not None:
        del encoder.prefix_init
    encoder.prefix = nn.Parameter(raw, requires_grad=requires_grad)
    return True


def merge_site_encoders(encoders: Iterable[PrefixSiteEncoder]) -> bool:
    """Merge every site encoder of one adapter (see :func:`merge_site_encoder`): used in memory by `merge_mlp` and on
    disk by `peft_prefix_plus.files.merge_mlp_files`.

    Args:
        encoders (`Iterable[PrefixSiteEncoder]`): The encoders of one adapter, one per site.

    Returns:
        `bool`: `True` if any encoder was merged, `False` if all already held raw prefixes.

    Example:

    ```py
    >>> merge_site_encoders(peft_model.base_model.model.prefix_plus_layer.prefix_plus_sites["default"].values())
    True
    ```
    """
    merged = [merge_site_encoder(encoder) for encoder in encoders]
    return any(merged)


def merged_from_record(config: PrefixPlusConfig) -> dict:
    """What `merge_mlp` records in ``config.merged_from``: the shape of the MLP the raw prefixes came from.

    Args:
        config ([`PrefixPlusConfig`]): The configuration of an adapter with ``prefix_projection=True``.

    Example:

    ```py
    >>> merged_from_record(PrefixPlusConfig(mlp_depth=3, mlp_activation="gelu", token_dim=32))
    {'depth': 3, 'hidden_size': 32, 'activation': 'gelu', 'token_dim': 32}
    ```
    """
    return {**config.mlp_shape, "token_dim": config.token_dim}


def mark_config_merged(config: PrefixPlusConfig) -> None:
    """Record a merge in an adapter configuration: ``prefix_projection=False`` and ``merged_from`` set.

    Args:
        config ([`PrefixPlusConfig`]): The configuration to update in place.

    Example:

    ```py
    >>> mark_config_merged(peft_model.peft_config["default"])
    ```
    """
    config.merged_from = merged_from_record(config)
    config.prefix_projection = False

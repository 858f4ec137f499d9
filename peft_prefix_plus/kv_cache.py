"""The prefix inside the KV cache: decoding steps that are the base model's own attention call.

During generation PrefixPlus seeds each attention layer's prefix into the front of that layer's KV cache once, at
the prompt's forward pass. Every later step then attends one key/value sequence (prefix, then cached tokens) in
the model's own fused attention call, instead of attending the prefix and the cache separately. The cache reports
lengths without the prefix (``get_seq_length``, ``get_mask_sizes``), so positions, ``cache_position`` and the masks
transformers builds are those of the real tokens, and the attention wrapper adds the prefix columns to the mask as it
does without a cache.

Only transformers' plain `DynamicLayer` is seeded (the default cache of `generate`). Static and sliding-window
caches, and attention modules whose own code reads the cached keys' shape (T5's relative position bias), keep the
prefix out of the cache and attend it separately.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers.cache_utils import DynamicLayer, EncoderDecoderCache

#: Attribute of a cache object holding its seeded layers, keyed ``(site, layer index)``.
SEEDED_ATTR = "_prefix_plus_seeded"


class PrefixedCacheLayer(DynamicLayer):
    """A `DynamicLayer` whose stored keys and values start with a prefix that its lengths leave out.

    The prefix is written in front of the first key/value states the layer receives (the prompt), expanded over
    the batch. Beam reordering, batch selection and cropping work on the stored tensors as for `DynamicLayer`; the
    prefix, being in front, is never cropped.

    Args:
        prefix_keys, prefix_values (`torch.Tensor`): ``(num_key_value_heads, length, head_dim)``, or with a leading
            batch dimension when the rows of a batch use different adapters.
        version (`int`): The PrefixPlus layer's prefix version when seeded; the attention wrapper uses the seeded
            prefix only while the version is current (the adapters did not change since).

    Example:

    ```py
    >>> layer = PrefixedCacheLayer(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8), version=0)
    >>> keys, _ = layer.update(torch.ones(1, 2, 3, 8), torch.ones(1, 2, 3, 8))
    >>> keys.shape[-2], layer.get_seq_length()
    (7, 3)
    ```
    """

    def __init__(self, prefix_keys: torch.Tensor, prefix_values: torch.Tensor, version: int) -> None:
        super().__init__()
        self.prefix = (prefix_keys, prefix_values)
        self.prefix_length = prefix_keys.shape[-2]
        self.version = version

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new states, writing the prefix in front of the first ones."""
        if not self.is_initialized:
            self.device, self.is_initialized = key_states.device, True
            self.keys = torch.cat([self._expanded(self.prefix[0], key_states), key_states], dim=-2)
            self.values = torch.cat([self._expanded(self.prefix[1], value_states), value_states], dim=-2)
            return self.keys, self.values
        return super().update(key_states, value_states, *args, **kwargs)

    @staticmethod
    def _expanded(prefix: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        prefix = prefix.to(device=states.device, dtype=states.dtype)
        return prefix.expand(states.shape[0], *prefix.shape[-3:])

    def get_seq_length(self) -> int:
        """The number of cached tokens, without the prefix."""
        if not self.is_initialized or self.keys is None:
            return 0
        return self.keys.shape[-2] - self.prefix_length

    def crop(self, tokens_to_remove: int) -> None:
        """Remove ``tokens_to_remove`` tokens from the end; the prefix stays."""
        super().crop(-min(abs(tokens_to_remove), self.get_seq_length()) if tokens_to_remove < 0 else tokens_to_remove)


def _site_cache(cache: Any, site: str) -> Any:
    """The cache that holds ``site``'s keys: the self- or cross-attention part of an `EncoderDecoderCache`."""
    if isinstance(cache, EncoderDecoderCache):
        return cache.cross_attention_cache if site == "cross" else cache.self_attention_cache
    return None if site == "cross" else cache


def seed_prefix_cache(
    cache: Any, targets: list[tuple[str, int, int, tuple[torch.Tensor, torch.Tensor]]], versions: dict[str, int]
) -> dict[tuple[str, int], PrefixedCacheLayer]:
    """Put prefixes into the empty layers of ``cache``, so that they are written in front of the prompt's states.

    Args:
        cache: The cache `generate` (or the caller) passes to the model, before its first forward pass.
        targets (`list`): ``(site, layer index in the site, cache layer index, (keys, values))`` per attention module.
        versions (`dict[str, int]`): The prefix version of each site (see [`PrefixedCacheLayer`]).

    Returns:
        `dict`: The seeded layers, keyed ``(site, layer index)``; also stored on the cache. Layers that are not an
        empty plain `DynamicLayer` are left alone.
    """
    seeded: dict[tuple[str, int], PrefixedCacheLayer] = {}
    for site, index, cache_index, (keys, values) in targets:
        part = _site_cache(cache, site)
        layers = getattr(part, "layers", None)
        if layers is None:
            continue
        if len(layers) <= cache_index:
            if getattr(part, "layer_class_to_replicate", None) is not DynamicLayer:
                continue
            layers.extend(DynamicLayer() for _ in range(cache_index + 1 - len(layers)))
        current = layers[cache_index]
        if type(current) is not DynamicLayer or current.is_initialized:
            continue
        layers[cache_index] = seeded[(site, index)] = PrefixedCacheLayer(keys, values, versions.get(site, 0))
    setattr(cache, SEEDED_ATTR, seeded)
    return seeded


def seeded_layers(cache: Any) -> Optional[dict[tuple[str, int], PrefixedCacheLayer]]:
    """The seeded layers of ``cache``, or `None` if it was never seeded."""
    return getattr(cache, SEEDED_ATTR, None)

"""The prefix inside the KV cache: decoding steps that are the base model's own attention call.

During generation PrefixPlus seeds each attention layer's prefix into the front of that layer's KV cache once, at
the prompt's forward pass. Every later step then attends one key/value sequence (prefix, then cached tokens) in
the model's own fused attention call, instead of attending the prefix and the cache separately. The cache reports
lengths without the prefix (``get_seq_length``, ``get_mask_sizes``), so positions, ``cache_position`` and the masks
transformers builds are those of the real tokens, and the attention wrapper adds the prefix columns to the mask as it
does without a cache.

Only transformers' plain `DynamicLayer` is seeded (the default cache of `generate`), in a cache passed to the model
(`generate` always passes one); a cache the model makes for itself inside its forward pass holds no prefix, and later
calls put the prefix in front of its keys. Static and sliding-window
caches, and attention modules whose own code reads the cached keys' shape (T5's relative position bias), keep the
prefix out of the cache: the attention wrapper puts it in front of the cached keys at every step.

The seeded layer is the only state that outlives a forward pass, and it belongs to the cache of one `generate` call.
It records whose prefix it holds (the PrefixPlus layer object itself, not a counter another model could match) and
for which adapter state, so another model's cache is refused and a changed adapter state attends its own prefix.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from transformers.cache_utils import DynamicLayer, EncoderDecoderCache

from ..errors import PrefixPlusValueError

#: Attribute of a cache object holding its seeded layers, keyed ``(site, layer index)``.
SEEDED_ATTR = "_prefix_plus_seeded"


class CacheOwner:
    """Identifies the PrefixPlus layer whose prefixes a KV cache holds.

    A distinct object per PrefixPlus layer: a cache seeded by one model is recognised as foreign by any other. It is
    shared, not copied, by `copy.deepcopy`, so a deep copy of a cache (prompt-cache reuse) still belongs to its model.
    """

    def __init__(self) -> None:
        #: set by `unload()`: the bare base model must not read a cache seeded with a prefix
        self.unloaded = False

    def __deepcopy__(self, memo: dict) -> CacheOwner:
        return self

    def __repr__(self) -> str:
        return f"CacheOwner(0x{id(self):x}{', unloaded' if self.unloaded else ''})"


class PrefixedCacheLayer(DynamicLayer):
    """A `DynamicLayer` whose stored keys and values start with a prefix that its lengths leave out.

    The prefix is written in front of the first key/value states the layer receives (the prompt), expanded over
    the batch. Beam reordering, batch selection and cropping work on the stored tensors as for `DynamicLayer`; the
    prefix, being in front, is never cropped.

    Args:
        prefix_keys, prefix_values (`torch.Tensor`): ``(num_key_value_heads, length, head_dim)``, or with a leading
            batch dimension when the rows of a batch use different adapters.
        owner ([`CacheOwner`], *optional*): Whose prefix this is. The attention wrapper of any other
            model refuses the cache, and once the owner is unloaded the cache refuses further tokens.
        state (`tuple`, *optional*): The owner's adapter state when seeded (`PrefixPlusLayer.prefix_state`); the
            seeded prefix is attended only while it is unchanged.

    Example:

    ```py
    >>> layer = PrefixedCacheLayer(torch.zeros(2, 4, 8), torch.zeros(2, 4, 8))
    >>> keys, _ = layer.update(torch.ones(1, 2, 3, 8), torch.ones(1, 2, 3, 8))
    >>> keys.shape[-2], layer.get_seq_length()
    (7, 3)
    ```
    """

    def __init__(
        self,
        prefix_keys: torch.Tensor,
        prefix_values: torch.Tensor,
        owner: Optional[CacheOwner] = None,
        state: tuple = (),
    ) -> None:
        super().__init__()
        self.prefix = (prefix_keys, prefix_values)
        self.prefix_length = prefix_keys.shape[-2]
        self.owner = owner
        self.state = state

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the new states, writing the prefix in front of the first ones."""
        if getattr(self.owner, "unloaded", False):
            raise PrefixPlusValueError(
                "This KV cache holds a PrefixPlus prefix in front of its keys, but the model that seeded it was "
                "unloaded (`unload()`): the base model would read the prefix as real tokens. Start a new cache "
                "(call `generate` or the model without `cache`)."
            )
        if not self.is_initialized:
            if not (self._fits(self.prefix[0], key_states) and self._fits(self.prefix[1], value_states)):
                # the model caches something other than the keys and values its attention receives (multi-head
                # latent attention caches the compressed latents): the prefix stays out of this cache, and the
                # attention call puts it in front of the keys at every step
                self.prefix_length = 0
                return super().update(key_states, value_states, *args, **kwargs)
            self.device, self.is_initialized = key_states.device, True
            self.keys = torch.cat([self._expanded(self.prefix[0], key_states), key_states], dim=-2)
            self.values = torch.cat([self._expanded(self.prefix[1], value_states), value_states], dim=-2)
            return self.keys, self.values
        return super().update(key_states, value_states, *args, **kwargs)

    @staticmethod
    def _fits(prefix: torch.Tensor, states: torch.Tensor) -> bool:
        """Whether ``prefix`` has the heads and width of the ``states`` the model caches."""
        return states.dim() == 4 and prefix.shape[-3] == states.shape[1] and prefix.shape[-1] == states.shape[-1]

    @staticmethod
    def _expanded(prefix: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        prefix = prefix.to(device=states.device, dtype=states.dtype)
        return prefix.expand(states.shape[0], *prefix.shape[-3:])

    def get_seq_length(self) -> int:
        """The number of cached tokens, without the prefix."""
        if not self.is_initialized or self.keys is None:
            return 0
        return self.keys.shape[-2] - self.prefix_length

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every row ``repeats`` times (beam search's expansion), also when the cache holds only the prefix."""
        if self.is_initialized and self.keys is not None:
            self.keys = self.keys.repeat_interleave(repeats, dim=0)
            self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices``, also when the cache holds only the prefix."""
        if self.is_initialized and self.keys is not None:
            self.keys = self.keys[indices, ...]
            self.values = self.values[indices, ...]

    def crop(self, tokens_to_remove: int) -> None:
        """Remove ``tokens_to_remove`` tokens from the end; the prefix stays."""
        super().crop(-min(abs(tokens_to_remove), self.get_seq_length()) if tokens_to_remove < 0 else tokens_to_remove)


def site_cache(cache: Any, site: str) -> Any:
    """The cache that holds ``site``'s keys: the self- or cross-attention part of an `EncoderDecoderCache`."""
    if isinstance(cache, EncoderDecoderCache):
        return cache.cross_attention_cache if site == "cross" else cache.self_attention_cache
    return None if site == "cross" else cache


def cache_layer(cache: Any, site: str, index: Optional[int]) -> Any:
    """Layer ``index`` of the part of ``cache`` that holds ``site``'s keys, or `None`."""
    layers = getattr(site_cache(cache, site), "layers", None)
    if layers is None or not isinstance(index, int) or not 0 <= index < len(layers):
        return None
    return layers[index]


def seed_prefix_cache(
    cache: Any, targets: list[tuple[str, int, tuple[torch.Tensor, torch.Tensor]]], **seed: Any
) -> int:
    """Put prefixes into the empty layers of ``cache``, so that they are written in front of the prompt's states.

    Args:
        cache: The cache `generate` (or the caller) passes to the model, before its first forward pass.
        targets (`list`): ``(site, cache layer index, (keys, values))`` per attention module.
        **seed: ``owner`` and ``state``, as [`PrefixedCacheLayer`] takes them.

    Returns:
        `int`: How many layers were seeded. Layers that are not an empty plain `DynamicLayer` are left alone.
    """
    seeded = 0
    for site, cache_index, (keys, values) in targets:
        part = site_cache(cache, site)
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
        layers[cache_index] = PrefixedCacheLayer(keys, values, **seed)
        seeded += 1
    return seeded

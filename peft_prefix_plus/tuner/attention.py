"""Attention-level injection through transformers' ``AttentionInterface``.

Every common transformers model computes attention with
``ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, eager_attention_forward)(module, q, k, v, ...)``.
PrefixPlus registers two implementations, ``prefix_plus_eager`` and ``prefix_plus_sdpa``, that put the prefix keys
and values of the calling module in front of its real keys and values, extend the attention mask (and T5's
``position_bias``) with "attend" columns, and hand over to the model's own eager function or to sdpa. Switching a
model's ``config._attn_implementation`` to one of them is all the model sees; no modeling code is copied.

Which modules are attention layers, and which site each one belongs to, is found by
`peft_prefix_plus.tuner.discovery`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from ..errors import PrefixPlusValueError, UnsupportedError
from .kv_cache import PrefixedCacheLayer, cache_layer

#: Attention implementations PrefixPlus can wrap, and the name of the wrapper registered for each.
WRAPPED_IMPLEMENTATIONS = {"eager": "prefix_plus_eager", "sdpa": "prefix_plus_sdpa"}
UNWRAPPED_IMPLEMENTATIONS = {wrapper: name for name, wrapper in WRAPPED_IMPLEMENTATIONS.items()}
#: Unpadded causal sdpa calls attend the prefix through a square, maskless ``is_causal`` call (see
#: `_square_causal_attention`); `False` passes a materialised mask instead (the tests compare the two).
SQUARE_CAUSAL = True
_ROUTE_ATTR = "_prefix_plus_route"
#: The keyword argument through which a forward pass hands its `PrefixCall` to every attention call of that pass.
CALL_KWARG = "prefix_plus_call"


@dataclass(frozen=True)
class PrefixCall:
    """What one forward pass tells the attention wrapper, passed down as a keyword argument (`CALL_KWARG`).

    transformers hands extra keyword arguments of a model's forward to every attention function of that call, in the
    recomputation of activation checkpointing too, so nothing about a pass is stored on a module: concurrent passes,
    interleaved passes and their recomputations each see their own.

    Args:
        rows (`tuple[str, ...]`, *optional*): One adapter name per batch row (``"__base__"`` for none), for a batch
            that mixes adapters.
        cache (*optional*): The KV cache of the pass, which may hold a seeded prefix.
        disabled (`bool`): Attend no prefix (text initialisation runs the base model this way).
        capture (`dict`, *optional*): Filled with ``(site, layer index) -> (keys, values)`` of every attention call.
    """

    rows: Optional[tuple[str, ...]] = None
    cache: Any = None
    disabled: bool = False
    capture: Optional[dict] = None


_PLAIN_CALL = PrefixCall()


def _eager_function(module: nn.Module) -> Callable:
    """The model's own eager attention function (T5's, for instance, adds ``position_bias``)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise UnsupportedError(
            f"{type(module).__name__} has no module-level `eager_attention_forward`; PrefixPlus cannot wrap its "
            "eager attention. Load the model with attn_implementation='sdpa'."
        )
    return fn


def _base_function(module: nn.Module, implementation: str) -> Callable:
    return _eager_function(module) if implementation == "eager" else sdpa_attention_forward


def _extend_mask(
    mask: Optional[torch.Tensor],
    length: int,
    query: torch.Tensor,
    key_length: int,
    causal: bool,
    boolean: bool,
    columns: Optional[torch.Tensor] = None,
) -> Optional[torch.Tensor]:
    """Add ``length`` prefix columns in front of ``mask`` (boolean or additive float).

    The prefix columns are "attend", or, when ``columns`` (``(batch, length)``, boolean) is given, what it says per
    row. A ``None`` mask is given the meaning the wrapped function gives it. Eager attention applies no mask at all,
    so ``None`` stays ``None``. sdpa (``boolean=True``) applies its own ``is_causal``, which is aligned to the top left
    and used only for more than one query; the wrapper has already dropped keys past the last query, so here top
    left and bottom right coincide and the prefix columns go in front of a square causal mask.
    """
    q_len, k_len = query.shape[2], key_length
    if mask is None:
        if boolean and causal and q_len > 1:
            # only the queries' own keys remain (see above), so row i sees the prefix and keys 0..i
            rows = torch.arange(q_len, device=query.device)[:, None] + (length + k_len - q_len)
            allowed = (torch.arange(length + k_len, device=query.device)[None, :] <= rows)[None, None]
        elif columns is None:
            return None
        else:
            allowed = torch.ones((1, 1, 1, length + k_len), dtype=torch.bool, device=query.device)
        if columns is not None:
            allowed = allowed & nn.functional.pad(columns, (0, k_len), value=True)[:, None, None, :]
        if boolean:
            return allowed
        return torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(
            ~allowed, torch.finfo(query.dtype).min
        )
    if columns is None:
        prefix = mask.new_ones if mask.dtype == torch.bool else mask.new_zeros
        return torch.cat([prefix((*mask.shape[:-1], length)), mask], dim=-1)
    batch = max(mask.shape[0], columns.shape[0])
    mask = mask.expand(batch, *mask.shape[1:])
    allowed = columns[:, None, None, :].expand(batch, *mask.shape[1:-1], length)
    if mask.dtype != torch.bool:
        allowed = torch.zeros(allowed.shape, dtype=mask.dtype, device=mask.device).masked_fill(
            ~allowed, torch.finfo(mask.dtype).min
        )
    return torch.cat([allowed, mask], dim=-1)


def _square_causal_attention(
    module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, length: int, **kwargs: Any
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """sdpa over ``length`` prefix keys and as many real keys as queries, causal, with no mask tensor.

    The queries get ``length`` zero rows in front, which makes the call square: sdpa's own ``is_causal`` then lets
    query row ``length + i`` see the prefix and the real keys ``0..i``, exactly the bottom-right causal structure,
    in the base model's own call shape (square, ``is_causal``, no mask), so sdpa may pick the same fused kernel (on a
    CPU its flash kernel, which skips the masked half where a materialised mask computes every score). The extra
    rows' outputs are dropped, so they take no part in the result or its gradients.
    """
    padded = torch.cat([query.new_zeros((*query.shape[:2], length, query.shape[3])), query], dim=2)
    output, weights = sdpa_attention_forward(module, padded, key, value, None, **kwargs)
    return output[:, length:], weights


FOREIGN_CACHE_MESSAGE = (
    "This KV cache was filled by another PrefixPlus model: the prefix in front of its keys is that model's. A cache "
    "can only be continued by the model that started it; start a new cache for this model (call `generate` or the "
    "model without `cache`)."
)


REBUILT_CACHE_MESSAGE = (
    "This KV cache holds {extra} more tokens than the attention mask covers, as many as the prefix of this PrefixPlus "
    "model: it was most likely rebuilt from a PrefixPlus cache (e.g. `DynamicCache(list(cache))` or a legacy tuple "
    "conversion), which turns the prefix in front of its keys into ordinary cached tokens. Continue the cache that "
    "`generate` or the model returned (or a `copy.deepcopy` of it), or start a new one."
)


def _make_prefix_attention(implementation: str) -> Callable:
    def prefix_attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        call: PrefixCall = kwargs.pop(CALL_KWARG, None) or _PLAIN_CALL
        base = _base_function(module, implementation)
        route = getattr(module, _ROUTE_ATTR, None)
        if route is None:
            return base(module, query, key, value, attention_mask, **kwargs)
        layer, site, index = route
        if call.capture is not None:  # text initialisation records the base model's states
            call.capture[(site, index)] = (key, value)
        rows = call.rows
        # During generation the prefix may already be at the front of the cached keys (see `kv_cache`)
        inside, columns = 0, None
        seeded = cache_layer(call.cache, site, getattr(module, "layer_idx", None)) if call.cache is not None else None
        # the module read this call's keys from that cache layer (compared by length: an offloading cache hands out a
        # copy on the device)
        if isinstance(seeded, PrefixedCacheLayer) and seeded.keys is not None and key.shape[2] == seeded.keys.shape[2]:
            if seeded.owner is not layer.cache_owner:
                raise PrefixPlusValueError(FOREIGN_CACHE_MESSAGE)
            if not call.disabled and seeded.state == layer.prefix_state(rows):
                inside = seeded.prefix_length  # 0 where the model caches something else (see `PrefixedCacheLayer`)
                if rows is not None and inside:
                    columns = layer.row_columns(site, index, rows, device=key.device)
                elif inside and query.shape[2] == 1 and attention_mask is None:
                    # a decoding step with nothing to mask: exactly the base model's call
                    return base(module, query, key, value, None, **kwargs)
            else:  # the adapters changed since the cache was seeded: attend the real keys, then the current prefix
                key, value = key[:, :, seeded.prefix_length :], value[:, :, seeded.prefix_length :]
        if not inside:
            prefix = None if call.disabled else layer.prefix_for(site, index, rows)
            if prefix is None:
                return base(module, query, key, value, attention_mask, **kwargs)
            prefix_keys, prefix_values, columns = prefix  # columns: per-row prefix columns of a mixed batch, else None
        length = inside or prefix_keys.shape[-2]
        real_length = key.shape[2] - inside
        # the default transformers' sdpa function uses when the call does not say
        causal = kwargs.get("is_causal")
        causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
        if attention_mask is None and implementation == "sdpa" and causal and 1 < query.shape[2] < real_length:
            # transformers passes no mask with more keys than queries only when sdpa's top-left `is_causal` is exact:
            # prefill into an empty pre-allocated (static) cache, whose slots past the last query are empty. A mask
            # aligned to the bottom right would attend to them; drop them, as transformers' sdpa function does.
            key, value = key[:, :, : inside + query.shape[2]], value[:, :, : inside + query.shape[2]]
            real_length = query.shape[2]
            if kwargs.get("position_bias") is not None:
                kwargs["position_bias"] = kwargs["position_bias"][..., : query.shape[2]]
        position_bias = kwargs.get("position_bias")
        # without padding, sdpa's causal attention over prefix and real keys needs no mask tensor (T5's position
        # bias makes sdpa build one anyway)
        square = (
            attention_mask is None
            and implementation == "sdpa"
            and causal
            and columns is None
            and position_bias is None
            and 1 < query.shape[2] == real_length
            and SQUARE_CAUSAL
        )
        if not inside:  # put the prefix in front of the keys
            batch = key.shape[0]
            prefix_keys = prefix_keys.to(device=key.device, dtype=key.dtype)
            prefix_values = prefix_values.to(device=value.device, dtype=value.dtype)
            key = torch.cat([prefix_keys.expand(batch, *prefix_keys.shape[-3:]), key], dim=2)
            value = torch.cat([prefix_values.expand(batch, *prefix_values.shape[-3:]), value], dim=2)
        if position_bias is not None:
            kwargs["position_bias"] = nn.functional.pad(position_bias, (length, 0))
        if square:
            return _square_causal_attention(module, query, key, value, length, **kwargs)
        extended = _extend_mask(
            attention_mask, length, query, real_length, causal, boolean=implementation == "sdpa", columns=columns
        )
        return base(module, query, key, value, extended, **kwargs)

    prefix_attention.__name__ = f"prefix_plus_{implementation}_attention"
    return prefix_attention


def register_attention_functions() -> None:
    """Register the PrefixPlus attention and mask functions with transformers (idempotent)."""
    masks = {"eager": eager_mask, "sdpa": sdpa_mask}
    for implementation, name in WRAPPED_IMPLEMENTATIONS.items():
        AttentionInterface.register(name, _make_prefix_attention(implementation))
        AttentionMaskInterface.register(name, masks[implementation])


def model_configs(model: nn.Module) -> list[Any]:
    """Every distinct transformers config object in ``model`` (T5's encoder and decoder hold copies, for instance)."""
    configs: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs.setdefault(id(config), config)
    return list(configs.values())


def wrap_attention_implementation(config: Any) -> None:
    """Switch one config to the PrefixPlus wrapper of its attention implementation.

    Raises:
        ValueError: If the implementation is neither eager, sdpa nor already wrapped.
    """
    implementation = config._attn_implementation
    if implementation in UNWRAPPED_IMPLEMENTATIONS:
        return
    if implementation not in WRAPPED_IMPLEMENTATIONS:
        raise UnsupportedError(
            f"The model's attention implementation is {implementation!r}; PrefixPlus supports 'eager' and 'sdpa'. "
            "Switch with `model.set_attn_implementation('sdpa')` (or 'eager')."
        )
    config._attn_implementation = WRAPPED_IMPLEMENTATIONS[implementation]


def unwrap_attention_implementations(model: nn.Module) -> None:
    """Give every config of ``model`` back the attention implementation its PrefixPlus wrapper stands for."""
    for config in model_configs(model):
        if config._attn_implementation in UNWRAPPED_IMPLEMENTATIONS:
            config._attn_implementation = UNWRAPPED_IMPLEMENTATIONS[config._attn_implementation]


def has_route(module: nn.Module) -> bool:
    """Whether ``module`` is an attention module routed to a PrefixPlus layer."""
    return hasattr(module, _ROUTE_ATTR)


def set_route(module: nn.Module, route: Optional[tuple[Any, str, int]]) -> None:
    """Point an attention module at the PrefixPlus layer, site and layer index it takes its prefix from."""
    if route is None:
        if hasattr(module, _ROUTE_ATTR):
            delattr(module, _ROUTE_ATTR)
    else:
        object.__setattr__(module, _ROUTE_ATTR, route)

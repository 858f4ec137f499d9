"""The geometry of a PrefixPlus adapter, from its config alone: the single source of truth for every tool.

A config whose ``site_shapes`` and ``token_dim`` are filled in (they are once an adapter has been created) fully
determines the adapter's sites, their prefix lengths, the layers they reach and the shape of every tensor. Reading,
merging, inspecting, converting and describing saved adapters all ask this module rather than re-deriving it.

Two levels are offered:

- :func:`adapter_geometry` and :func:`expected_counts` are pure arithmetic (no tensor, no list as long as the
  number of layers), so an absurd config (``num_layers: 1e9``) can be measured and refused in microseconds;
- :func:`build_site_encoders` builds the real :class:`~peft_prefix_plus.tuner.layer.PrefixSiteEncoder` modules on the
  meta device, so the expected parameter names and shapes come from their ``state_dict()``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from ..errors import PrefixPlusConfigError
from .config import PrefixPlusConfig, check_site_shapes_value, site_layer_shapes
from .layer import PrefixSiteEncoder, prefix_shape


@dataclass(frozen=True)
class SiteGeometry:
    """Where and how big the prefix of one attention site is.

    Args:
        site (`str`): ``"self"``, ``"encoder"`` or ``"cross"``.
        num_virtual_tokens (`int`): Prefix length at this site.
        num_layers (`int`): Number of attention layers of the model at this site (the whole stack).
        layer_indices (`range` or `tuple[int, ...]`): Indices (within the stack) of the layers that get a prefix.
        num_key_value_heads (`int`): Key/value heads of the attention at this site (of its first layer).
        head_dim (`int`): Head dimension of the attention at this site (of its first layer's keys).
        layer_shapes (`tuple`, *optional*): ``(heads, key dim, value dim)`` of each transformed layer, where the
            site's layers differ or keys are wider than values; `None` when every layer has ``(num_key_value_heads,
            head_dim, head_dim)``.

    Example:

    ```py
    >>> SiteGeometry("self", 8, 4, range(4), 2, 16).shape
    (4, 2, 2, 8, 16)
    ```
    """

    site: str
    num_virtual_tokens: int
    num_layers: int
    layer_indices: Union[range, tuple[int, ...]]
    num_key_value_heads: int
    head_dim: int
    layer_shapes: Optional[tuple[tuple[int, int, int], ...]] = None

    @property
    def transformed_layer_shapes(self) -> list[tuple[int, int, int]]:
        """``(heads, key dim, value dim)`` of each transformed layer."""
        if self.layer_shapes is not None:
            return list(self.layer_shapes)
        return [(self.num_key_value_heads, self.head_dim, self.head_dim)] * len(self.layer_indices)

    @property
    def per_layer(self) -> bool:
        """Whether the site's layers differ in shape, or keys are wider than values (the row layout)."""
        return len(self.shape) == 2

    @property
    def shape(self) -> tuple[int, ...]:
        """The raw prefix shape: ``(transformed layers, 2, num_key_value_heads, num_virtual_tokens, head_dim)``, or
        ``(num_virtual_tokens, width)`` where the layers differ (see `PrefixSiteEncoder`)."""
        if self.layer_shapes is None:
            return (len(self.layer_indices), 2, self.num_key_value_heads, self.num_virtual_tokens, self.head_dim)
        return prefix_shape(self.num_virtual_tokens, list(self.layer_shapes))

    @property
    def out_features(self) -> int:
        """Width of one virtual token's prefix over all layers: the MLP's output width."""
        if self.layer_shapes is None:  # arithmetic only: an absurd layer count is measured before it is refused
            return len(self.layer_indices) * 2 * self.num_key_value_heads * self.head_dim
        return sum(heads * (key_dim + value_dim) for heads, key_dim, value_dim in self.layer_shapes)

    @property
    def covers_all_layers(self) -> bool:
        """Whether every layer of the stack gets a prefix at this site."""
        return len(self.layer_indices) == self.num_layers


def is_encoder_decoder(site_shapes: Mapping[str, Any]) -> bool:
    """Whether ``site_shapes`` describe an encoder-decoder model: the one rule every tool uses.

    An encoder-decoder model has an encoder self-attention or a decoder cross-attention site besides ``"self"``.

    Args:
        site_shapes (`Mapping`): ``PrefixPlusConfig.site_shapes``.

    Example:

    ```py
    >>> is_encoder_decoder({"self": {...}, "encoder": {...}, "cross": {...}})
    True
    ```
    """
    return any(site in site_shapes for site in ("encoder", "cross"))


def layer_indices(num_layers: int, layers_to_transform: Optional[Sequence[int]]) -> Union[range, tuple[int, ...]]:
    """Indices of the layers that get a prefix in a stack of ``num_layers`` layers.

    Returns a ``range`` (no memory, whatever ``num_layers``) when every layer is transformed.

    Args:
        num_layers (`int`): Layers in the stack.
        layers_to_transform (`Sequence[int]`, *optional*): ``PrefixPlusConfig.layers_to_transform``.

    Example:

    ```py
    >>> layer_indices(4, [0, 2, 7])
    (0, 2)
    ```
    """
    if layers_to_transform is None:
        return range(num_layers)
    return tuple(sorted(i for i in set(layers_to_transform) if i < num_layers))


def check_site_shapes(config: PrefixPlusConfig) -> dict[str, dict[str, int]]:
    """Validate the creation-time fields a config needs to describe tensors: ``site_shapes`` and ``token_dim``.

    Args:
        config ([`PrefixPlusConfig`]): The config.

    Returns:
        `dict`: ``config.site_shapes``.

    Raises:
        ValueError: Naming the field, when ``site_shapes`` is missing or malformed, or ``token_dim`` is missing or not
            a positive integer while the adapter uses an MLP.

    Example:

    ```py
    >>> check_site_shapes(PrefixPlusConfig(site_shapes={"self": {"num_layers": 2, "num_key_value_heads": 2,
    ...     "head_dim": 8}}, prefix_projection=False))
    ```
    """
    shapes = config.site_shapes
    if shapes is None:
        raise PrefixPlusConfigError(
            "`site_shapes` is not filled in: it is set when an adapter is created (`get_peft_model`). Use the config "
            "saved with the adapter."
        )
    check_site_shapes_value(shapes)
    if config.prefix_projection:
        token_dim = config.token_dim
        if isinstance(token_dim, bool) or not isinstance(token_dim, int) or token_dim < 1:
            raise PrefixPlusConfigError(
                f"`token_dim` must be a positive integer when the adapter uses an MLP (prefix_projection=True); "
                f"got {token_dim!r}."
            )
    return dict(shapes)


def adapter_geometry(config: PrefixPlusConfig) -> dict[str, SiteGeometry]:
    """The geometry of every site that has parameters: non-zero length and at least one transformed layer.

    Pure arithmetic: nothing proportional to the sizes in the config is allocated.

    Args:
        config ([`PrefixPlusConfig`]): A config with ``site_shapes`` (and ``token_dim`` with an MLP) filled in.

    Returns:
        `dict[str, SiteGeometry]`: In site order (``self``, ``encoder``, ``cross``).

    Raises:
        ValueError: If ``site_shapes`` or ``token_dim`` is missing or malformed.

    Example:

    ```py
    >>> adapter_geometry(peft_model.peft_config["default"])["self"].shape
    (2, 2, 2, 8, 8)
    ```
    """
    shapes = check_site_shapes(config)
    geometry = {}
    for site, length in config.site_lengths(is_encoder_decoder(shapes)).items():
        shape = shapes.get(site)
        if not length or shape is None:
            continue
        layers = layer_indices(shape["num_layers"], config.layers_to_transform)
        if not layers:
            continue
        if "layer_shapes" in shape:
            every_layer = site_layer_shapes(shape)
            heads, head_dim, _ = every_layer[0]
            transformed = tuple(every_layer[index] for index in layers)
        else:  # one shape for every layer: nothing as long as the number of layers is built
            heads, head_dim, transformed = shape["num_key_value_heads"], shape["head_dim"], None
        geometry[site] = SiteGeometry(site, length, shape["num_layers"], layers, heads, head_dim, transformed)
    return geometry


def expected_counts(config: PrefixPlusConfig, geometry: Mapping[str, SiteGeometry]) -> tuple[int, int]:
    """How many tensors and how many values the adapter's prefix encoders hold, by arithmetic alone.

    Used to refuse a config that calls for more than a file holds before anything is built.

    Args:
        config ([`PrefixPlusConfig`]): The config.
        geometry (`Mapping[str, SiteGeometry]`): From :func:`adapter_geometry`.

    Returns:
        `tuple[int, int]`: ``(number of tensors, number of values)`` over all sites.

    Example:

    ```py
    >>> expected_counts(config, adapter_geometry(config))
    (4, 7296)
    ```
    """
    tensors = values = 0
    for site in geometry.values():
        if not config.prefix_projection:
            tensors += 1
            values += site.out_features * site.num_virtual_tokens
            continue
        token_dim, depth = config.token_dim, config.mlp_depth
        hidden = config.mlp_hidden_size or token_dim
        tensors += 1 + 2 * (depth + 1)
        values += site.num_virtual_tokens * token_dim  # embedding
        values += token_dim * hidden + hidden + (depth - 1) * (hidden * hidden + hidden)  # hidden layers
        values += hidden * site.out_features + site.out_features  # output layer
        if config.init_weights == "text":  # the saved prefix_init buffer the MLP's output is added to
            tensors += 1
            values += site.out_features * site.num_virtual_tokens
    return tensors, values


def build_site_encoders(config: PrefixPlusConfig, device: Union[str, torch.device] = "meta") -> nn.ModuleDict:
    """Build the real prefix encoders of an adapter, one per site, on ``device`` (the meta device by default).

    On the meta device nothing is allocated: the result gives the expected parameter names and shapes through its
    ``state_dict()``, and takes real tensors with ``load_state_dict(tensors, assign=True)``. Check the sizes with
    :func:`expected_counts` first when the config is untrusted: building needs memory proportional to the number of
    layers.

    Args:
        config ([`PrefixPlusConfig`]): A config with ``site_shapes`` (and ``token_dim`` with an MLP) filled in.
        device (`str` or `torch.device`): Where to create the parameters.

    Returns:
        `nn.ModuleDict`: ``{site: PrefixSiteEncoder}``, as ``PrefixPlusLayer.prefix_plus_sites[adapter]`` holds them.

    Example:

    ```py
    >>> encoders = build_site_encoders(config)
    >>> {name: tuple(t.shape) for name, t in encoders.state_dict().items()}
    {'self.embedding.weight': (8, 32), 'self.mlp.0.weight': (32, 32), ...}
    ```
    """
    encoders = nn.ModuleDict()
    with torch.device(device):
        for site, geometry in adapter_geometry(config).items():
            encoders[site] = PrefixSiteEncoder(
                geometry.num_virtual_tokens,
                list(geometry.layer_indices),
                geometry.num_key_value_heads,
                geometry.head_dim,
                config,
                geometry.transformed_layer_shapes,
            )
    return encoders


def format_layer_shapes(layer_shapes: Sequence[tuple[int, int, int]]) -> str:
    """A site's key/value shapes as text: ``"2 × 16"`` where every layer has one shape and keys as wide as values,
    else each distinct shape with its layer count (``"3 layers 2 × 16, 1 layer 2 × 512"``; ``"4 × 24 keys, 12
    values"`` where keys are wider than values).

    Args:
        layer_shapes (`Sequence[tuple[int, int, int]]`): ``(heads, key dim, value dim)`` per layer.

    Example:

    ```py
    >>> format_layer_shapes([(4, 24, 12)] * 2)
    '4 × 24 keys, 12 values'
    ```
    """

    def one(shape: tuple[int, int, int]) -> str:
        heads, key_dim, value_dim = shape
        return f"{heads} × {key_dim}" if key_dim == value_dim else f"{heads} × {key_dim} keys, {value_dim} values"

    counts: dict[tuple[int, int, int], int] = {}
    for shape in layer_shapes:
        counts[tuple(shape)] = counts.get(tuple(shape), 0) + 1
    if len(counts) == 1:
        return one(next(iter(counts)))
    return ", ".join(f"{count} layer{'s' if count > 1 else ''} {one(shape)}" for shape, count in counts.items())

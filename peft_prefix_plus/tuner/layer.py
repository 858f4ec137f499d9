"""The trainable parts of a PrefixPlus adapter: one prefix encoder per attention site and adapter."""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.activations import ACT2FN

from ..errors import AdapterFileError, UnsupportedError
from .config import PrefixPlusConfig, site_layer_shapes
from .kv_cache import CacheOwner

MERGE_INTO_WEIGHTS_MESSAGE = (
    "PrefixPlus prefixes cannot be merged into the base model's weights: a prefix adds key/value columns to every "
    "attention call, which no weight matrix can express. Use `merge_mlp()` to replace the prefix MLP by the raw "
    "prefixes it produces (exact, and the usual step before deployment), or `unload()` to get the base model back."
)


def build_mlp(token_dim: int, hidden_size: int, depth: int, activation: str, out_features: int) -> nn.Sequential:
    """The prefix MLP: ``depth`` hidden layers of width ``hidden_size``, each followed by ``activation``.

    Args:
        token_dim (`int`): Input width (the width of the prefix embedding).
        hidden_size (`int`): Width of each hidden layer.
        depth (`int`): Number of hidden layers.
        activation (`str`): Name of the activation in `transformers.activations.ACT2FN`.
        out_features (`int`): Output width: `num_layers * 2 * num_key_value_heads * head_dim`.

    Example:

    ```py
    >>> build_mlp(64, 128, 2, "gelu", 4 * 2 * 2 * 16)
    ```
    """
    layers: list[nn.Module] = []
    in_features = token_dim
    for _ in range(depth):
        layers += [nn.Linear(in_features, hidden_size), ACT2FN[activation]]
        in_features = hidden_size
    layers.append(nn.Linear(in_features, out_features))
    return nn.Sequential(*layers)


def site_layout(flat: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """View prefixes stored one row per virtual token, as the MLP produces them and stock PEFT saves them, in the
    site layout ``(num_layers, 2, num_key_value_heads, num_virtual_tokens, head_dim)`` (no copy).

    A site whose layers differ in shape keeps the row layout: its shape is ``(num_virtual_tokens, width)``, and
    ``flat`` is returned as it is.

    Args:
        flat (`torch.Tensor`): Shape ``(num_virtual_tokens, num_layers * 2 * num_key_value_heads * head_dim)``, each
            row laid out as ``(layer, key/value, head, head_dim)``.
        shape (`tuple`): The site shape (`PrefixSiteEncoder.shape`).

    Example:

    ```py
    >>> site_layout(torch.zeros(20, 4 * 2 * 2 * 16), (4, 2, 2, 20, 16)).shape
    torch.Size([4, 2, 2, 20, 16])
    ```
    """
    if len(shape) == 2:
        return flat.view(shape)
    num_layers, _, heads, length, head_dim = shape
    return flat.view(length, num_layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4)


def prefix_shape(num_virtual_tokens: int, layer_shapes: list[tuple[int, int, int]]) -> tuple[int, ...]:
    """The shape a site's raw prefix is held in: the site layout ``(layers, 2, heads, num_virtual_tokens, head_dim)``
    where every layer has ``(heads, head_dim, head_dim)``, else the row layout ``(num_virtual_tokens, width)`` (see
    `PrefixSiteEncoder`).

    Args:
        num_virtual_tokens (`int`): Prefix length.
        layer_shapes (`list[tuple[int, int, int]]`): ``(heads, key dim, value dim)`` of each transformed layer.

    Example:

    ```py
    >>> prefix_shape(8, [(4, 24, 12)] * 2)
    (8, 144)
    ```
    """
    heads, key_dim, value_dim = layer_shapes[0]
    if key_dim == value_dim and all(tuple(shape) == (heads, key_dim, value_dim) for shape in layer_shapes):
        return (len(layer_shapes), 2, heads, num_virtual_tokens, key_dim)
    return (num_virtual_tokens, sum(h * (k + v) for h, k, v in layer_shapes))


def tensor_mismatches(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]) -> list[str]:
    """What differs between the tensors a config calls for and those saved: missing, unexpected, other shapes.

    Args:
        expected (`dict[str, tuple]`): Name to shape, from the encoders the config builds.
        found (`dict[str, tuple]`): Name to shape, as saved.

    Example:

    ```py
    >>> tensor_mismatches({"self.prefix": (2, 2, 2, 4, 8)}, {"self.prefix": (2, 2, 2, 5, 8)})
    ['self.prefix has shape (2, 2, 2, 5, 8), the config calls for (2, 2, 2, 4, 8)']
    ```
    """
    problems = []
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing {missing}")
    if unexpected:
        problems.append(f"not called for by the config {unexpected}")
    problems += [
        f"{name} has shape {found[name]}, the config calls for {shape}"
        for name, shape in expected.items()
        if name in found and tuple(found[name]) != tuple(shape)
    ]
    return problems


class PrefixSiteEncoder(nn.Module):
    """Produces the key/value prefixes of one attention site (e.g. decoder self-attention) for all its layers.

    Where every layer has the same key/value heads and one head dimension for keys and values, the prefixes are held
    in the site layout ``(num_layers, 2, num_key_value_heads, num_virtual_tokens, head_dim)``: index ``[i, 0]`` holds
    the keys and ``[i, 1]`` the values of the ``i``-th transformed layer, in the layout attention uses. Where layers
    differ (Gemma 4's sliding and full layers), or keys are wider than values (multi-head latent attention), they are
    held in the row layout ``(num_virtual_tokens, width)``: each row holds, layer by layer, that layer's keys
    (``heads * key_dim``) and then its values (``heads * value_dim``), so each layer gets exactly its own width. The
    prefixes do not depend on the batch.

    Args:
        num_virtual_tokens (`int`): Prefix length.
        layer_indices (`list[int]`): Indices (within the stack) of the layers that get a prefix at this site.
        num_key_value_heads (`int`): Key/value heads of the model's attention at this site.
        head_dim (`int`): Head dimension of the model's attention at this site.
        config ([`PrefixPlusConfig`]): Supplies the projection, MLP, dropout and initialisation settings.
        layer_shapes (`list[tuple[int, int, int]]`, *optional*): ``(heads, key dim, value dim)`` of each transformed
            layer, where they differ from ``(num_key_value_heads, head_dim, head_dim)``.

    Example:

    ```py
    >>> encoder = PrefixSiteEncoder(8, [0, 1, 2, 3], num_key_value_heads=2, head_dim=16, config=config)
    >>> encoder().shape
    torch.Size([4, 2, 2, 8, 16])
    ```
    """

    def __init__(
        self,
        num_virtual_tokens: int,
        layer_indices: list[int],
        num_key_value_heads: int,
        head_dim: int,
        config: PrefixPlusConfig,
        layer_shapes: Optional[list[tuple[int, int, int]]] = None,
    ) -> None:
        super().__init__()
        num_layers = len(layer_indices)
        if layer_shapes is None:
            layer_shapes = [(num_key_value_heads, head_dim, head_dim)] * num_layers
        self.layer_shapes = [tuple(shape) for shape in layer_shapes]
        self.num_virtual_tokens = num_virtual_tokens
        self.slots = {layer: slot for slot, layer in enumerate(layer_indices)}
        widths = [heads * (key_dim + value_dim) for heads, key_dim, value_dim in self.layer_shapes]
        #: column where each slot's keys start in a row of the MLP's output (or of the row layout)
        self.offsets = [sum(widths[:slot]) for slot in range(num_layers + 1)]
        out_features = self.offsets[-1]
        self.shape = prefix_shape(num_virtual_tokens, self.layer_shapes)
        self.dropout = nn.Dropout(config.prefix_dropout)
        if config.prefix_projection:
            self.embedding = nn.Embedding(num_virtual_tokens, config.token_dim)
            hidden = config.mlp_hidden_size or config.token_dim
            self.mlp = build_mlp(config.token_dim, hidden, config.mlp_depth, config.mlp_activation, out_features)
            if config.init_weights in ("zero", "text"):
                nn.init.zeros_(self.mlp[-1].weight)
                nn.init.zeros_(self.mlp[-1].bias)
            if config.init_weights == "text":
                # the MLP learns a correction to the prefix captured from the text, which is saved with the adapter
                self.register_buffer("prefix_init", torch.zeros(self.shape))
        else:
            self.prefix = nn.Parameter(torch.empty(self.shape))
            if config.init_weights == "zero":
                nn.init.zeros_(self.prefix)
            else:
                nn.init.normal_(self.prefix)

    @property
    def is_row_layout(self) -> bool:
        """Whether the prefixes are held in the row layout (the site's layers differ in shape)."""
        return len(self.shape) == 2

    @property
    def is_projected(self) -> bool:
        """Whether the prefixes come from an MLP (`True`) or are raw parameters (`False`)."""
        return hasattr(self, "mlp")

    def project(self) -> torch.Tensor:
        """Every layer's prefix at once, in the site layout, without dropout (for merging and inspection)."""
        if not self.is_projected:
            return self.prefix
        out = site_layout(self.mlp(self.embedding.weight), self.shape)
        return out + self.prefix_init if hasattr(self, "prefix_init") else out

    def layer_prefix(self, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of one layer, ``(heads, num_virtual_tokens, key_dim)`` and ``(heads,
        num_virtual_tokens, value_dim)``.

        A pure function of the parameters, computed where the attention call needs it: a raw prefix is indexed; an
        MLP runs its trunk on the embedding (``num_virtual_tokens`` rows, cheap) and then only this layer's rows of
        its last linear layer, whose output columns are laid out layer by layer.

        Args:
            slot (`int`): The layer's position among this site's transformed layers.
        """
        heads, key_dim, value_dim = self.layer_shapes[slot]
        columns = slice(self.offsets[slot], self.offsets[slot + 1])
        if not self.is_projected:
            if not self.is_row_layout:
                keys, values = self.dropout(self.prefix[slot])
                return keys, values
            flat = self.prefix[:, columns]
        else:
            *trunk, last = self.mlp
            hidden = self.embedding.weight
            for module in trunk:
                hidden = module(hidden)
            flat = nn.functional.linear(hidden, last.weight[columns], last.bias[columns])
            if hasattr(self, "prefix_init") and self.is_row_layout:
                flat = flat + self.prefix_init[:, columns]
        length = self.num_virtual_tokens
        if self.is_row_layout:
            keys = flat[:, : heads * key_dim].view(length, heads, key_dim).transpose(0, 1)
            values = flat[:, heads * key_dim :].view(length, heads, value_dim).transpose(0, 1)
            return self.dropout(keys), self.dropout(values)
        pair = flat.view(length, 2, heads, key_dim).permute(1, 2, 0, 3)
        if hasattr(self, "prefix_init"):
            pair = pair + self.prefix_init[slot]
        keys, values = self.dropout(pair)
        return keys, values

    def pack(self, layer_prefixes: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """Every transformed layer's ``(keys, values)``, as `layer_prefix` returns them, in this encoder's layout.

        Args:
            layer_prefixes (`list[tuple[torch.Tensor, torch.Tensor]]`): One pair per slot, in slot order.

        Example:

        ```py
        >>> torch.equal(encoder.pack([encoder.layer_prefix(s) for s in range(len(encoder.slots))]), encoder.project())
        True
        ```
        """
        if not self.is_row_layout:
            return torch.stack([torch.stack(pair) for pair in layer_prefixes])
        length = self.num_virtual_tokens
        return torch.cat([part.transpose(0, 1).reshape(length, -1) for pair in layer_prefixes for part in pair], dim=1)

    @torch.no_grad()
    def set_initial_prefix(self, prefix: torch.Tensor) -> None:
        """Make ``prefix`` (in the site layout) the prefix this encoder produces now: the raw prefix itself, or the
        fixed part of an MLP whose last layer is zero (text initialisation).

        Args:
            prefix (`torch.Tensor`): Of this encoder's `shape` (see `pack`).
        """
        target = self.prefix_init if self.is_projected else self.prefix
        target.copy_(prefix.to(device=target.device, dtype=target.dtype))

    def forward(self, slot: Optional[int] = None) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The whole site's prefix (``slot=None``), or one layer's keys and values (see `layer_prefix`).

        Attention calls go through here rather than calling `layer_prefix` directly, so that module wrappers that
        act around `forward` (FSDP2's `fully_shard` gathering sharded parameters, offloading hooks) see every use.
        """
        if slot is None:
            return self.dropout(self.project())
        return self.layer_prefix(slot)


#: The attribute of the adapted model that holds its `PrefixPlusLayer`.
LAYER_ATTR = "prefix_plus_layer"
#: The `PrefixPlusLayer` attribute that holds the prefix encoders, ``[adapter_name][site]``.
SITES_ATTR = "prefix_plus_sites"
#: Every PrefixPlus tensor's state-dict key contains this, whatever the adapter name and the wrapping.
KEY_MARKER = f"{LAYER_ATTR}.{SITES_ATTR}."
#: Key prefix of PrefixPlus tensors in a saved adapter, followed by ``<site>.<parameter>`` (PEFT drops the adapter
#: name when it saves).
KEY_PREFIX = f"base_model.model.{KEY_MARKER}"


def is_modules_to_save_key(key: str, modules_to_save: Any) -> bool:
    """Whether ``key`` is a tensor PEFT saves for ``modules_to_save`` (e.g. a classification head).

    PEFT wraps every module whose name ends with one of the names (a string suffix: ``"norm"`` also wraps
    ``input_layernorm``) and saves its tensors under the module's name; keys holding ``modules_to_save`` are accepted
    too.

    Args:
        key (`str`): A key of ``adapter_model.safetensors``.
        modules_to_save (`list[str]`, *optional*): The config's ``modules_to_save``.

    Example:

    ```py
    >>> is_modules_to_save_key("base_model.model.classifier.dense.weight", ["classifier"])
    True
    ```
    """
    parts = key.split(".")
    if "modules_to_save" in parts:
        return True
    names = [name for name in modules_to_save if isinstance(name, str)] if isinstance(modules_to_save, list) else []
    modules = (".".join(parts[:end]) for end in range(1, len(parts)))  # every module on the key's path
    return any(module.endswith(name) for module in modules for name in names)


class PrefixPlusLayer(nn.Module, BaseTunerLayer):
    """Holds the prefix encoders of every adapter, keyed ``[adapter_name][site]``, and hands out their prefixes.

    It replaces no module of the base model; it is attached to the model so that PEFT's adapter switching
    (`set_adapter`, `disable_adapter`, `delete_adapter`) reaches it like any other tuner layer.
    """

    adapter_layer_names = (SITES_ATTR,)

    def __init__(self) -> None:
        super().__init__()
        self.prefix_plus_sites = nn.ModuleDict()
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.merged_adapters = []
        # device of the attention layers of each site, where its prefix encoders live
        self.site_devices: dict[str, torch.device] = {}
        # recorded in every KV cache seeded with this layer's prefixes (see `kv_cache`)
        self.cache_owner = CacheOwner()

    def __deepcopy__(self, memo: dict) -> PrefixPlusLayer:
        """A deep copy is another model: it gets its own `CacheOwner` (which itself is shared by copies of a cache)."""
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        for key, value in self.__dict__.items():
            copied.__dict__[key] = copy.deepcopy(value, memo)
        copied.cache_owner = CacheOwner()
        return copied

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise UnsupportedError(MERGE_INTO_WEIGHTS_MESSAGE)

    def unmerge(self) -> None:
        """Nothing to do: prefixes are never merged into weights."""

    def update_layer(
        self,
        adapter_name: str,
        config: PrefixPlusConfig,
        lengths: dict[str, int],
        site_layers: dict[str, list[int]],
    ) -> None:
        """Create the prefix encoders of ``adapter_name`` for every site whose length is non-zero.

        Args:
            adapter_name (`str`): The adapter name.
            config ([`PrefixPlusConfig`]): The adapter's configuration (with `site_shapes` filled in).
            lengths (`dict[str, int]`): Prefix length per site.
            site_layers (`dict[str, list[int]]`): Indices of the transformed layers per site.
        """
        sites = nn.ModuleDict()
        for site, length in lengths.items():
            if length == 0 or not site_layers.get(site):
                continue
            layer_shapes = site_layer_shapes(config.site_shapes[site])
            heads, head_dim, _ = layer_shapes[0]
            transformed = [layer_shapes[index] for index in site_layers[site]]
            sites[site] = PrefixSiteEncoder(length, site_layers[site], heads, head_dim, config, transformed)
        self.prefix_plus_sites[adapter_name] = sites
        self._move_adapter_to_device_of_base_layer(adapter_name)

    def check_saved_weights(self, adapter_name: str, found: dict[str, torch.Tensor]) -> None:
        """Refuse saved weights that do not match the adapter's config; warn about NaN/Inf. Called by PEFT's loading.

        PEFT loads an adapter with ``strict=False`` and only warns about missing keys, so a hand-edited
        `adapter_config.json` (another `mlp_depth`, `prefix_projection`, length or site) would load as a randomly
        initialised adapter. The weights are compared with the real encoders the config built.

        Args:
            adapter_name (`str`): The adapter being loaded.
            found (`dict[str, torch.Tensor]`): Its saved PrefixPlus tensors, keyed ``<site>.<parameter>``.

        Raises:
            ValueError: Naming every missing, unexpected, reshaped or non-floating-point tensor.
        """
        expected = {name: tuple(t.shape) for name, t in self.prefix_plus_sites[adapter_name].state_dict().items()}
        problems = tensor_mismatches(expected, {name: tuple(t.shape) for name, t in found.items()})
        problems += [f"{name} has dtype {t.dtype}" for name, t in found.items() if not t.is_floating_point()]
        dtypes = sorted({str(t.dtype) for t in found.values()})
        if len(dtypes) > 1:
            problems.append(f"the tensors mix dtypes {dtypes} (one adapter uses one dtype)")
        if problems:
            raise AdapterFileError(
                f"The saved weights of PrefixPlus adapter {adapter_name!r} do not match its config: "
                f"{'; '.join(problems)}. The adapter_config.json does not describe these weights (edited by hand, or "
                "copied from another adapter); restore the config that was saved with them."
            )
        for name, tensor in found.items():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                warnings.warn(
                    f"PrefixPlus adapter {adapter_name!r}: {name} holds {bad} non-finite value(s) (NaN/Inf), so the "
                    "model's outputs will be NaN. The adapter file is corrupt or training diverged; "
                    "`prefix-plus inspect` shows where.",
                    UserWarning,
                    stacklevel=2,
                )

    def _move_adapter_to_device_of_base_layer(self, adapter_name: str, device: Optional[torch.device] = None) -> None:
        """Move the prefix encoders of ``adapter_name`` to the device of their site's attention layers."""
        for site, encoder in self.prefix_plus_sites[adapter_name].items():
            target = device or self.site_devices.get(site)
            # parameters still on the meta device (low_cpu_mem_usage) are assigned by the state dict later
            if target is not None and not any(p.is_meta for p in encoder.parameters()):
                encoder.to(target)

    def _active_encoders(self, site: str) -> list[PrefixSiteEncoder]:
        return [
            self.prefix_plus_sites[name][site]
            for name in self.active_adapters
            if name in self.prefix_plus_sites and site in self.prefix_plus_sites[name]
        ]

    def _row_encoders(self, site: str, rows: tuple[str, ...]) -> dict[str, PrefixSiteEncoder]:
        return {
            name: self.prefix_plus_sites[name][site]
            for name in dict.fromkeys(rows)
            if name in self.prefix_plus_sites and site in self.prefix_plus_sites[name]
        }

    def prefix_state(self, rows: Optional[tuple[str, ...]] = None) -> tuple:
        """What decides which prefix a call attends: the active adapters, whether they are disabled, and the adapter
        of each row of a mixed batch. A prefix seeded into a KV cache is used while this is unchanged."""
        return tuple(self.active_adapters), self.disable_adapters, rows

    def prefix_for(
        self, site: str, layer: int, rows: Optional[tuple[str, ...]] = None
    ) -> Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
        """The ``(keys, values, columns)`` prefix of layer ``layer`` of ``site``, or ``None``: computed from the
        adapters' parameters at each call.

        Keys and values have shape ``(num_key_value_heads, prefix_length, head_dim)``, shared by every row; several
        active adapters contribute their prefixes one after the other, and ``columns`` is `None`. In a batch that
        mixes adapters (``rows``: one adapter name per row, ``"__base__"`` for none) they have shape
        ``(batch, num_key_value_heads, prefix_length, head_dim)``, padded to the longest adapter, and ``columns``,
        ``(batch, prefix_length)``, says which prefix columns of each row may be attended to.

        Args:
            site (`str`): ``"self"``, ``"encoder"`` or ``"cross"``.
            layer (`int`): The layer's index within the site.
            rows (`tuple[str, ...]`, *optional*): One adapter name per batch row, for a batch that mixes adapters.
        """
        if self.disable_adapters:
            return None
        if rows is not None:
            return self._row_prefix(site, layer, rows)
        pairs = [encoder(encoder.slots[layer]) for encoder in self._active_encoders(site) if layer in encoder.slots]
        if not pairs:
            return None
        if len(pairs) == 1:
            return pairs[0][0], pairs[0][1], None
        return torch.cat([keys for keys, _ in pairs], dim=1), torch.cat([values for _, values in pairs], dim=1), None

    def _row_prefix(
        self, site: str, layer: int, rows: tuple[str, ...]
    ) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """One layer's batched prefix in which each row holds its own adapter's prefix, padded to the longest with
        columns that no query attends to."""
        encoders = {
            name: encoder for name, encoder in self._row_encoders(site, rows).items() if layer in encoder.slots
        }
        if not encoders:
            return None
        produced = {name: encoder(encoder.slots[layer]) for name, encoder in encoders.items()}
        sample_keys, sample_values = next(iter(produced.values()))
        width = max(encoder.num_virtual_tokens for encoder in encoders.values())
        keys = sample_keys.new_zeros((len(rows), sample_keys.shape[0], width, sample_keys.shape[2]))
        values = sample_values.new_zeros((len(rows), sample_values.shape[0], width, sample_values.shape[2]))
        for name, (name_keys, name_values) in produced.items():
            index = [i for i, row in enumerate(rows) if row == name]
            length = name_keys.shape[1]
            keys[index, :, :length] = name_keys
            values[index, :, :length] = name_values
        return keys, values, self.row_columns(site, layer, rows, device=sample_keys.device)

    def row_columns(
        self, site: str, layer: int, rows: tuple[str, ...], device: Optional[torch.device] = None
    ) -> Optional[torch.Tensor]:
        """``(batch, prefix_length)``: which prefix columns each row of a mixed batch attends to at ``layer``."""
        encoders = {
            name: encoder for name, encoder in self._row_encoders(site, rows).items() if layer in encoder.slots
        }
        if not encoders:
            return None
        width = max(encoder.num_virtual_tokens for encoder in encoders.values())
        lengths = torch.tensor(
            [encoders[row].num_virtual_tokens if row in encoders else 0 for row in rows], device=device
        )
        return torch.arange(width, device=device)[None, :] < lengths[:, None]

    def active_length(self, site: str) -> int:
        """Total prefix length of the active adapters at ``site`` (0 when disabled)."""
        if self.disable_adapters:
            return 0
        return sum(encoder.num_virtual_tokens for encoder in self._active_encoders(site))

    def adapter_length(self, adapter_name: str, site: str) -> int:
        """Prefix length of one adapter at ``site`` (0 for ``"__base__"`` or an adapter without that site)."""
        sites = self.prefix_plus_sites[adapter_name] if adapter_name in self.prefix_plus_sites else {}  # noqa: SIM401
        return sites[site].num_virtual_tokens if site in sites else 0

"""The trainable parts of a PrefixPlus adapter: one prefix encoder per attention site and adapter."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.activations import ACT2FN

from .config import PrefixPlusConfig
from .kv_cache import PrefixedCacheLayer

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


def site_layout(flat: torch.Tensor, shape: tuple[int, int, int, int, int]) -> torch.Tensor:
    """View prefixes stored one row per virtual token, as the MLP produces them and stock PEFT saves them, in the
    site layout ``(num_layers, 2, num_key_value_heads, num_virtual_tokens, head_dim)`` (no copy).

    Args:
        flat (`torch.Tensor`): Shape ``(num_virtual_tokens, num_layers * 2 * num_key_value_heads * head_dim)``, each
            row laid out as ``(layer, key/value, head, head_dim)``.
        shape (`tuple`): The site shape.

    Example:

    ```py
    >>> site_layout(torch.zeros(20, 4 * 2 * 2 * 16), (4, 2, 2, 20, 16)).shape
    torch.Size([4, 2, 2, 20, 16])
    ```
    """
    num_layers, _, heads, length, head_dim = shape
    return flat.view(length, num_layers, 2, heads, head_dim).permute(1, 2, 3, 0, 4)


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

    The output has shape ``(num_layers, 2, num_key_value_heads, num_virtual_tokens, head_dim)``: index ``[i, 0]``
    holds the keys and ``[i, 1]`` the values of the ``i``-th transformed layer, in the layout attention uses. The
    prefixes do not depend on the batch: they are computed once per forward pass and broadcast over the batch.

    Args:
        num_virtual_tokens (`int`): Prefix length.
        layer_indices (`list[int]`): Indices (within the stack) of the layers that get a prefix at this site.
        num_key_value_heads (`int`): Key/value heads of the model's attention at this site.
        head_dim (`int`): Head dimension of the model's attention at this site.
        config ([`PrefixPlusConfig`]): Supplies the projection, MLP, dropout and initialisation settings.

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
    ) -> None:
        super().__init__()
        num_layers = len(layer_indices)
        self.slots = {layer: slot for slot, layer in enumerate(layer_indices)}
        self.shape = (num_layers, 2, num_key_value_heads, num_virtual_tokens, head_dim)
        self.dropout = nn.Dropout(config.prefix_dropout)
        out_features = num_layers * 2 * num_key_value_heads * head_dim
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
    def is_projected(self) -> bool:
        """Whether the prefixes come from an MLP (`True`) or are raw parameters (`False`)."""
        return hasattr(self, "mlp")

    def project(self) -> torch.Tensor:
        """Run the MLP (or return the raw prefix), without dropout."""
        if not self.is_projected:
            return self.prefix
        out = site_layout(self.mlp(self.embedding.weight), self.shape)
        return out + self.prefix_init if hasattr(self, "prefix_init") else out

    @torch.no_grad()
    def set_initial_prefix(self, prefix: torch.Tensor) -> None:
        """Make ``prefix`` (in the site layout) the prefix this encoder produces now: the raw prefix itself, or the
        fixed part of an MLP whose last layer is zero (text initialisation).

        Args:
            prefix (`torch.Tensor`): Shape ``(num_layers, 2, num_key_value_heads, num_virtual_tokens, head_dim)``.
        """
        target = self.prefix_init if self.is_projected else self.prefix
        target.copy_(prefix.to(device=target.device, dtype=target.dtype))

    def forward(self) -> torch.Tensor:
        return self.dropout(self.project())


class PrefixPlusLayer(nn.Module, BaseTunerLayer):
    """Holds the prefix encoders of every adapter, keyed ``[adapter_name][site]``, and hands out their prefixes.

    It replaces no module of the base model; it is attached to the model so that PEFT's adapter switching
    (`set_adapter`, `disable_adapter`, `delete_adapter`) reaches it like any other tuner layer.
    """

    adapter_layer_names = ("prefix_plus_sites",)

    def __init__(self) -> None:
        super().__init__()
        self.prefix_plus_sites = nn.ModuleDict()
        self._active_adapter: list[str] = []
        self._disable_adapters = False
        self.merged_adapters = []
        # site -> [(layer index -> slot, per slot the (keys, values) of one adapter)], valid for the current pass
        self._prefixes: dict[str, list[tuple[dict[int, int], list[tuple[torch.Tensor, ...]]]]] = {}
        # site -> layer index -> (keys, values, columns) for a batch that mixes adapters, valid for the current pass
        self._row_prefixes: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        # (site, layer index) -> (keys, values) while text initialisation runs the base model
        self.capture: Optional[dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]] = None
        # one adapter name per input row while a call with `adapter_names` runs (see PrefixPlusModel)
        self.row_adapters: Optional[list[str]] = None
        # set by PrefixPlusModel when the model uses activation checkpointing
        self.checkpointing = False
        # (id of the input mask, geometry) -> (input mask, extended mask) in the current forward pass, for all layers
        self._masks: dict[tuple, tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = {}
        # device of the attention layers of each site, where its prefix encoders live
        self.site_devices: dict[str, torch.device] = {}
        # site -> how many times its prefixes were computed; a prefix seeded into a KV cache is used while it is current
        self.versions: dict[str, int] = {}
        # how many times every prefix was dropped (`clear()`), which a decoding step's reuse of prefixes checks
        self.clears = 0
        # (site, layer index) -> the KV cache layer holding that layer's prefix in front of its keys, during a pass
        self.seeded: dict[tuple[str, int], PrefixedCacheLayer] = {}

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        raise NotImplementedError(MERGE_INTO_WEIGHTS_MESSAGE)

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
            shape = config.site_shapes[site]
            sites[site] = PrefixSiteEncoder(
                length, site_layers[site], shape["num_key_value_heads"], shape["head_dim"], config
            )
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
            raise ValueError(
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

    def refresh(self, sites: tuple[str, ...], rows: Optional[list[str]] = None) -> None:
        """Compute the prefixes of ``sites`` for the coming forward pass: once per site and adapter, all layers at once.

        Args:
            sites (`tuple[str, ...]`): The sites to compute.
            rows (`list[str]`, *optional*): One adapter name per batch row (``"__base__"`` for none), for a batch that
                mixes adapters; `None` gives every row the active adapters' prefixes.
        """
        for site in sites:
            self._prefixes.pop(site, None)
            self._row_prefixes.pop(site, None)
            self.versions[site] = self.versions.get(site, 0) + 1
        if self.disable_adapters:
            return
        if rows is not None:
            for site in sites:
                self._refresh_rows(site, rows)
            return
        for site in sites:
            # Split into per-layer keys and values once, with `unbind`: its backward gathers the gradients of all
            # layers into one tensor, where indexing per layer would allocate a zero-filled gradient of the whole
            # prefix for every layer.
            entries = [
                (encoder.slots, [pair.unbind(0) for pair in self._produce(encoder).unbind(0)])
                for encoder in self._active_encoders(site)
            ]
            if entries:
                self._prefixes[site] = entries

    def _refresh_rows(self, site: str, rows: list[str]) -> None:
        """Per layer, batched prefixes in which each row holds its own adapter's prefix, padded to the longest with
        columns that no query attends to."""
        encoders = {
            name: self.prefix_plus_sites[name][site]
            for name in dict.fromkeys(rows)
            if name in self.prefix_plus_sites and site in self.prefix_plus_sites[name]
        }
        if not encoders:
            return
        produced = {name: [pair.unbind(0) for pair in encoder().unbind(0)] for name, encoder in encoders.items()}
        sample = next(iter(produced.values()))[0][0]
        kv_heads, head_dim = sample.shape[0], sample.shape[2]
        width = max(encoder.shape[3] for encoder in encoders.values())
        batch_rows = {name: [i for i, row in enumerate(rows) if row == name] for name in encoders}
        per_layer: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for name, encoder in encoders.items():
            for layer, slot in encoder.slots.items():
                if layer not in per_layer:
                    keys = sample.new_zeros((len(rows), kv_heads, width, head_dim))
                    columns = torch.zeros((len(rows), width), dtype=torch.bool, device=sample.device)
                    per_layer[layer] = (keys, torch.zeros_like(keys), columns)
                keys, values, columns = per_layer[layer]
                length, index = encoder.shape[3], batch_rows[name]
                keys[index, :, :length] = produced[name][slot][0]
                values[index, :, :length] = produced[name][slot][1]
                columns[index, :length] = True
        self._row_prefixes[site] = per_layer

    def _produce(self, encoder: PrefixSiteEncoder) -> torch.Tensor:
        prefix = encoder()
        if not (self.checkpointing and prefix.requires_grad and prefix.grad_fn is not None):
            return prefix
        # Under reentrant activation checkpointing every layer runs its own backward pass, and a shared MLP graph
        # would be walked (and freed) by the first of them. The layers therefore read a detached copy, and each
        # gradient arriving at it is sent on through the MLP graph, which is kept until the next forward pass.
        detached = prefix.detach().requires_grad_(True)
        detached.register_hook(lambda grad: prefix.backward(grad, retain_graph=True))
        return detached

    def _active_encoders(self, site: str) -> list[PrefixSiteEncoder]:
        return [
            self.prefix_plus_sites[name][site]
            for name in self.active_adapters
            if name in self.prefix_plus_sites and site in self.prefix_plus_sites[name]
        ]

    def prefix_for(self, site: str, layer: int) -> Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]]:
        """The ``(keys, values, columns)`` prefix of layer ``layer`` of ``site`` for this forward pass, or ``None``.

        Keys and values have shape ``(num_key_value_heads, prefix_length, head_dim)``, shared by every row; several
        active adapters contribute their prefixes one after the other, and ``columns`` is `None`. In a batch that
        mixes adapters (``adapter_names``) they have shape ``(batch, num_key_value_heads, prefix_length, head_dim)``
        and ``columns``, ``(batch, prefix_length)``, says which prefix columns of each row may be attended to.
        """
        if site in self._row_prefixes:
            return self._row_prefixes[site].get(layer)
        keys, values = [], []
        for slots, pairs in self._prefixes.get(site, ()):
            slot = slots.get(layer)
            if slot is not None:
                keys.append(pairs[slot][0])
                values.append(pairs[slot][1])
        if not keys:
            return None
        if len(keys) == 1:
            return keys[0], values[0], None
        return torch.cat(keys, dim=1), torch.cat(values, dim=1), None

    def active_length(self, site: str) -> int:
        """Total prefix length of the active adapters at ``site`` (0 when disabled)."""
        if self.disable_adapters:
            return 0
        return sum(encoder.shape[3] for encoder in self._active_encoders(site))

    def adapter_length(self, adapter_name: str, site: str) -> int:
        """Prefix length of one adapter at ``site`` (0 for ``"__base__"`` or an adapter without that site)."""
        sites = self.prefix_plus_sites[adapter_name] if adapter_name in self.prefix_plus_sites else {}  # noqa: SIM401
        return sites[site].shape[3] if site in sites else 0

    def clear(self, sites: Optional[tuple[str, ...]] = None) -> None:
        """Drop the prefixes of the last forward pass (and the autograd graph they hold) and the extended masks.

        Args:
            sites (`tuple[str, ...]`, *optional*): Drop only these sites' prefixes; `None` drops all.
        """
        for site in list(self._prefixes) + list(self._row_prefixes) if sites is None else sites:
            self._prefixes.pop(site, None)
            self._row_prefixes.pop(site, None)
        self._masks.clear()
        if sites is None:  # e.g. `merge_mlp()`: prefixes kept across decoding steps must be computed again
            self.clears += 1

    def release_seeded(self, sites: tuple[str, ...]) -> None:
        """Forget the seeded KV cache layers of ``sites`` (the cache is the caller's to keep or drop)."""
        if self.seeded:
            self.seeded = {key: found for key, found in self.seeded.items() if key[0] not in sites}

    def begin_pass(self) -> None:
        """Forget the extended attention masks of the previous forward pass."""
        self._masks.clear()

    def memo(self, mask: Optional[torch.Tensor], geometry: tuple) -> tuple[bool, Optional[torch.Tensor]]:
        """Whether an extended ``mask`` for ``geometry`` was remembered in this forward pass, and that mask.

        The input mask is compared by identity: every layer of a pass receives the same mask object.
        """
        entry = self._masks.get((id(mask), geometry))
        if entry is not None and entry[0] is mask:
            return True, entry[1]
        return False, None

    def remember(self, mask: Optional[torch.Tensor], geometry: tuple, extended: Optional[torch.Tensor]) -> None:
        """Remember the extended ``mask`` for the rest of this forward pass."""
        self._masks[(id(mask), geometry)] = (mask, extended)

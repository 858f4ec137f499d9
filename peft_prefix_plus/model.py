"""The PrefixPlus tuner: attaches attention-level prefixes to a transformers model."""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, _delete_auxiliary_adapter
from peft.utils.other import AuxiliaryTrainingWrapper, _get_submodules
from torch import nn

from .attention import (
    WRAPPED_IMPLEMENTATIONS,
    AttentionSite,
    discover_attention_sites,
    model_configs,
    register_attention_functions,
    set_attention_implementation,
    set_route,
)
from .config import PrefixPlusConfig
from .geometry import layer_indices
from .layer import PrefixPlusLayer

LAYER_ATTR = "prefix_plus_layer"


class PrefixPlusModel(BaseTuner):
    """Prefix tuning at the attention level, with distinct encoder, decoder and cross-attention prefixes.

    Created by `peft.get_peft_model` from a [`PrefixPlusConfig`]; not instantiated directly. The model's attention
    implementation is switched to a PrefixPlus wrapper of the same kind (eager or sdpa), and a forward pre-hook
    computes every site's prefixes once per forward pass. `unload()` restores the model exactly.

    Args:
        model ([`~transformers.PreTrainedModel`]): The model to adapt.
        config ([`PrefixPlusConfig`]): The adapter configuration.
        adapter_name (`str`): The adapter name, `"default"` by default.

    Example:

    ```py
    >>> from peft import get_peft_model
    >>> from transformers import AutoModelForSeq2SeqLM
    >>> from peft_prefix_plus import PrefixPlusConfig

    >>> base = AutoModelForSeq2SeqLM.from_pretrained("google-t5/t5-small")
    >>> config = PrefixPlusConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=16, encoder_num_virtual_tokens=8)
    >>> model = get_peft_model(base, config)
    ```
    """

    prefix: str = "prefix_plus_"
    _prefixes_owner: Optional[weakref.ref] = None
    _prefixes_state: Optional[tuple] = None
    tuner_layer_cls = PrefixPlusLayer
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state = True

    # ------------------------------------------------------------------ injection
    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: Optional[dict[str, torch.Tensor]] = None,
    ) -> None:
        config: PrefixPlusConfig = self.peft_config[adapter_name]
        if not isinstance(config, PrefixPlusConfig):
            raise ValueError(f"PrefixPlusModel needs a PrefixPlusConfig, got {type(config).__name__}.")
        sites = self._discover(model)
        lengths = config.site_lengths(self._is_encoder_decoder)
        self._check_config(config, sites, lengths)  # before anything in the model changes
        self._install(model, sites)
        site_layers = {
            site: list(layer_indices(len(found.modules), config.layers_to_transform)) for site, found in sites.items()
        }
        layer: PrefixPlusLayer = getattr(model, LAYER_ATTR)
        layer.update_layer(adapter_name, config, lengths, site_layers)
        super().inject_adapter(
            model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage
        )

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - no module is replaced
        raise NotImplementedError("PrefixPlus replaces no module.")

    def _check_target_module_exists(self, *args: Any, **kwargs: Any) -> bool:
        return False

    def _discover(self, model: nn.Module) -> dict[str, AttentionSite]:
        """Find the attention sites of ``model`` (once per model) without changing the model."""
        if getattr(self, "_sites", None) is not None:
            return self._sites
        register_attention_functions()
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "_attn_implementation"):
            raise ValueError(f"PrefixPlus needs a transformers model (PreTrainedModel), got {type(model).__name__}.")
        self._is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        implementations = {c._attn_implementation for c in model_configs(model)}
        unsupported = implementations - set(WRAPPED_IMPLEMENTATIONS)
        if unsupported:
            raise ValueError(
                f"PrefixPlus supports attn_implementation 'eager' and 'sdpa'; the model uses {sorted(unsupported)}. "
                "Load the model with attn_implementation='sdpa' (or 'eager')."
            )
        self._accepts_position_ids = "position_ids" in inspect.signature(model.forward).parameters
        return discover_attention_sites(model)

    def _install(self, model: nn.Module, sites: dict[str, AttentionSite]) -> None:
        """Switch the attention implementation, route the attention modules and add the hooks (once per model)."""
        if getattr(self, "_sites", None) is not None:
            return
        for param in model.parameters():  # the base model is frozen, as by every PEFT tuner
            param.requires_grad = False
        layer = PrefixPlusLayer()
        model.add_module(LAYER_ATTR, layer)
        for site, found in sites.items():
            for index, module in enumerate(found.modules):
                set_route(module, (layer, site, index))
            parameter = next(found.modules[0].parameters(), None)
            if parameter is not None:
                layer.site_devices[site] = parameter.device
        saved = {id(c): c._attn_implementation for c in model_configs(model)}
        set_attention_implementation(model, {key: WRAPPED_IMPLEMENTATIONS[impl] for key, impl in saved.items()})
        self._saved_attn_implementations = saved
        self._sites = sites
        self._hooks = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward),
        ]
        self._top_sites = tuple(s for s in ("self", "cross") if s in sites)
        if "encoder" in sites:
            encoder = model.get_encoder()
            inside = {id(m) for m in encoder.modules()}
            if all(id(m) in inside for m in sites["encoder"].modules):
                self._hooks.append(encoder.register_forward_pre_hook(self._before_encoder_forward))
            else:  # the encoder is not a separate module: compute its prefixes with the others
                self._top_sites += ("encoder",)
        # modules carrying transformers' `gradient_checkpointing` flag, read before every forward pass
        self._checkpointing_modules = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]

    def _check_config(
        self, config: PrefixPlusConfig, sites: dict[str, AttentionSite], lengths: dict[str, int]
    ) -> None:
        model_type = getattr(self.model.config, "model_type", type(self.model).__name__)
        if not self._is_encoder_decoder:
            for name in ("encoder_num_virtual_tokens", "cross_num_virtual_tokens"):
                if getattr(config, name) is not None:
                    raise ValueError(
                        f"`{name}` is set to {getattr(config, name)}, but {model_type!r} is not an encoder-decoder "
                        "model: it has no encoder self-attention or cross-attention. Leave it as None."
                    )
        elif config.offset_position_ids:
            raise ValueError(
                f"`offset_position_ids=True` is supported for decoder-only models only; {model_type!r} is an "
                "encoder-decoder model. Leave it as False."
            )
        if config.offset_position_ids and not self._accepts_position_ids:
            raise ValueError(
                f"`offset_position_ids=True` needs a model whose forward takes `position_ids`; {model_type!r} does not."
            )
        if config.layers_to_transform is not None:
            for site, length in lengths.items():
                count = len(sites[site].modules) if site in sites else 0
                if length and max(config.layers_to_transform) >= count:
                    raise ValueError(
                        f"`layers_to_transform` {config.layers_to_transform} is out of range: the '{site}' attention "
                        f"of {model_type!r} has {count} layers (valid indices 0 to {count - 1})."
                    )
        shapes = {
            site: {
                "num_layers": len(found.modules),
                "num_key_value_heads": found.num_key_value_heads,
                "head_dim": found.head_dim,
            }
            for site, found in sites.items()
        }
        if config.site_shapes is not None:  # an adapter that was trained before: it must fit this model
            for site, length in lengths.items():
                if not length:
                    continue
                expected, actual = config.site_shapes.get(site), shapes.get(site)
                if expected != actual:
                    raise ValueError(
                        f"The adapter was made for a model whose '{site}' attention has {expected} (layers, key/value "
                        f"heads, head dimension), but this {model_type!r} model has {actual}. Load the adapter onto the "
                        "base model it was trained with."
                    )
        else:
            config.site_shapes = shapes
        token_dim = _hidden_size(self.model.config)
        if config.token_dim is None:
            config.token_dim = token_dim
        if config.prefix_projection and config.token_dim is None:
            raise ValueError(
                f"Could not read the hidden size of {model_type!r}; set `token_dim` in the PrefixPlusConfig."
            )

    # ------------------------------------------------------------------ forward
    @property
    def _layer(self) -> PrefixPlusLayer:
        return getattr(self.model, LAYER_ATTR)

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        layer = self._layer
        layer.checkpointing = module.training and any(
            getattr(m, "gradient_checkpointing", False) is True for m in self._checkpointing_modules
        )
        layer.begin_pass()
        cache = _cache_argument(kwargs)
        # During cached decoding the parameters cannot change between steps (no gradients are being computed), so
        # the prefixes of the first step of a `generate` call are reused until its cache object is done with.
        decoding = cache is not None and not torch.is_grad_enabled()
        owner = self._prefixes_owner() if self._prefixes_owner is not None else None
        state = (tuple(layer.active_adapters), layer.disable_adapters)
        if not (decoding and owner is cache and state == self._prefixes_state):
            layer.refresh(self._top_sites)
            self._prefixes_owner = weakref.ref(cache) if decoding else None
            self._prefixes_state = state
        if self._uses_position_offset():
            kwargs = self._offset_position_ids(args, kwargs, layer.active_length("self"))
        return args, kwargs

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        layer = self._layer
        if layer.checkpointing:
            return  # recomputation in the backward pass reads the prefixes and masks again
        if self._prefixes_owner is None:
            # The autograd graph keeps what the backward pass needs; holding the prefixes and the extended masks until
            # the next pass would only add them to the step's peak memory.
            layer.clear()
        else:
            layer.begin_pass()  # cached decoding: keep the prefixes for the next step

    def _before_encoder_forward(self, module: nn.Module, args: tuple) -> None:
        self._layer.begin_pass()
        self._layer.refresh(("encoder",))

    def _uses_position_offset(self) -> bool:
        layer = self._layer
        return not layer.disable_adapters and any(
            self.peft_config[name].offset_position_ids for name in layer.active_adapters if name in self.peft_config
        )

    @staticmethod
    def _offset_position_ids(args: tuple, kwargs: dict, length: int) -> dict:
        """Shift real tokens' position ids by the prefix length, as stock PEFT's past_key_values route does."""
        if not length:
            return kwargs
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            tokens = kwargs.get("input_ids", args[0] if args else None)
            if tokens is None:
                tokens = kwargs["inputs_embeds"]
            cache = _cache_argument(kwargs)
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + tokens.shape[1], device=tokens.device).unsqueeze(0)
        return {**kwargs, "position_ids": position_ids + length}

    # ------------------------------------------------------------------ adapter management
    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        # modules_to_save (e.g. a classification head) are wrapped by PEFT, which manages their requires_grad itself
        wrapped = [
            name + "." for name, module in model.named_modules() if isinstance(module, AuxiliaryTrainingWrapper)
        ]
        for name, param in model.named_parameters():
            if f"{LAYER_ATTR}." not in name and not name.startswith(tuple(wrapped)):
                param.requires_grad = False

    def enable_adapter_layers(self) -> None:
        """Enable the active adapters' prefixes (and their `modules_to_save`)."""
        super().enable_adapter_layers()

    def disable_adapter_layers(self) -> None:
        """Disable all prefixes (and `modules_to_save`): the model computes exactly as the base model."""
        super().disable_adapter_layers()
        self._layer.clear()

    def merge_mlp(self, adapter_names: Optional[list[str]] = None) -> list[str]:
        """Replace the prefix MLP of adapters by the raw prefixes it produces, computed once in float32.

        The outputs do not change; afterwards the adapter trains, saves and loads as a raw prefix, and its config
        records the merge (`prefix_projection=False`, `merged_from`). Reachable as `peft_model.merge_mlp()`.

        Args:
            adapter_names (`list[str]`, *optional*): The adapters to merge; `None` means the active adapters.

        Returns:
            `list[str]`: The adapters merged (an adapter that is already raw is skipped with a warning).

        Example:

        ```py
        >>> peft_model.merge_mlp()
        ['default']
        ```
        """
        from .merge import merge_mlp

        return merge_mlp(self, adapter_names)

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete the adapter ``adapter_name``; if it was active, the first remaining adapter becomes active.

        Args:
            adapter_name (`str`): Name of the adapter to delete.
        """
        if adapter_name not in self.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} does not exist; adapters: {sorted(self.peft_config)}.")
        del self.peft_config[adapter_name]
        # PEFT's generic deletion skips modules whose name contains the method prefix, as ours does
        layer = self._layer
        layer.delete_adapter(adapter_name)
        self.active_adapter = layer.active_adapters[:]
        _delete_auxiliary_adapter(self.model, adapter_name, new_active_adapters=self.active_adapter)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise ValueError(
            "Prefixes cannot be merged into the base model's weights. Use `unload()` to get the base model back, "
            "or `merge_mlp()` to replace the prefix MLP by the raw prefixes it produces."
        )

    def unload(self) -> nn.Module:
        """Remove PrefixPlus from the model and return the base model, which computes exactly as before.

        Modules in `modules_to_save` (e.g. a classification head) get the base model's original module back; the
        trained copy stays reachable before unloading, as ``<module>.modules_to_save[adapter_name]``.
        """
        model = self.model
        for hook in getattr(self, "_hooks", []):
            hook.remove()
        if getattr(self, "_sites", None) is not None:
            for found in self._sites.values():
                for module in found.modules:
                    set_route(module, None)
            set_attention_implementation(model, self._saved_attn_implementations)
        for name, module in list(model.named_modules()):  # modules_to_save: put the base model's own module back
            if isinstance(module, AuxiliaryTrainingWrapper):
                parent, _, target_name = _get_submodules(model, name)
                setattr(parent, target_name, module.original_module)
        if hasattr(model, LAYER_ATTR):
            delattr(model, LAYER_ATTR)
        if hasattr(model, "peft_config"):
            del model.peft_config
        self._sites = None
        return model

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # keys look like '...prefix_plus_layer.prefix_plus_sites.<adapter>.<site>.mlp.0.weight'
        marker = f".prefix_plus_sites.{adapter_name}."
        if marker in key:
            return key.replace(marker, ".prefix_plus_sites.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    def _prepare_adapter_config(self, peft_config: PrefixPlusConfig, model_config: dict) -> PrefixPlusConfig:
        return peft_config


def _hidden_size(config: Any) -> Optional[int]:
    for name in ("hidden_size", "d_model", "n_embd"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    text_config = getattr(config, "text_config", None)
    return _hidden_size(text_config) if text_config is not None else None


def _cache_argument(kwargs: dict) -> Any:
    """The KV cache passed to a transformers forward (`cache` in transformers 5, `past_key_values` before)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache

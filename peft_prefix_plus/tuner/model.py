"""The PrefixPlus tuner: attaches attention-level prefixes to a transformers model."""

from __future__ import annotations

import copy
import inspect
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any, Optional, Union

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _delete_auxiliary_adapter
from peft.utils.other import AuxiliaryTrainingWrapper, _get_submodules
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from ..errors import (
    AdapterFileError,
    PrefixPlusConfigError,
    PrefixPlusTypeError,
    PrefixPlusValueError,
    UnsupportedError,
)
from .attention import (
    CALL_KWARG,
    FOREIGN_CACHE_MESSAGE,
    REBUILT_CACHE_MESSAGE,
    UNWRAPPED_IMPLEMENTATIONS,
    WRAPPED_IMPLEMENTATIONS,
    PrefixCall,
    has_route,
    model_configs,
    set_route,
    unwrap_attention_implementations,
    wrap_attention_implementation,
)
from .config import PrefixPlusConfig, site_layer_shapes, site_shapes_entry
from .discovery import AttentionSite, discover_attention_sites, execution_device, stack_keywords_reach_attention
from .geometry import layer_indices
from .kv_cache import PrefixedCacheLayer, cache_layer, seed_prefix_cache
from .layer import (
    KEY_MARKER,
    LAYER_ATTR,
    MERGE_INTO_WEIGHTS_MESSAGE,
    SITES_ATTR,
    PrefixPlusLayer,
    is_modules_to_save_key,
)
from .merge import mark_config_merged, merge_site_encoders
from .text_init import initialise_from_text

#: Keyword argument by which a temporary hook hands per-call options (`PrefixCall` fields) to the stack hook.
OPTIONS_KWARG = "prefix_plus_options"
#: transformers' continuous batching (`generate_batch`, `continuous_batching_context_manager`,
#: `generate(cache_implementation="paged")`, `transformers serve`) all start a manager through this method.
CONTINUOUS_BATCHING_ENTRY = "init_continuous_batching"
CONTINUOUS_BATCHING_MESSAGE = (
    "Continuous batching (`generate_batch`, `init_continuous_batching`, `continuous_batching_context_manager`, "
    "`generate(cache_implementation='paged')`) is not supported with PrefixPlus adapters: it replaces the model's "
    "attention implementation and KV cache, which carry the PrefixPlus prefix. Use `generate` instead (padded "
    "batches are supported), or call `peft_model.unload()` first to run the base model without the adapter."
)


def _refuse_continuous_batching(*args: Any, **kwargs: Any) -> Any:
    """Stands in for the base model's `init_continuous_batching` while PrefixPlus adapters are attached."""
    raise UnsupportedError(CONTINUOUS_BATCHING_MESSAGE)


#: A decoder attention module that seeds its prefix into the generation cache: (site, layer index, cache index).
Seed = tuple[str, int, int]


@dataclass(frozen=True)
class StackPlan:
    """What the pre-hook of one attention stack does.

    Args:
        sites (`tuple[str, ...]`): The sites whose attention layers the stack runs.
        mask_positions (`bool`): The stack derives position ids from the attention mask (see `_positions_from_mask`).
        delivers (`bool`): The stack hands the pass's `PrefixCall` to its attention calls as a keyword argument.
        seeds (`tuple[Seed, ...]`): The attention modules whose prefix it seeds into an empty generation cache.
    """

    sites: tuple[str, ...]
    mask_positions: bool
    delivers: bool
    seeds: tuple[Seed, ...]


def _attention_stacks(model: nn.Module, sites: dict[str, AttentionSite]) -> list[tuple[nn.Module, tuple[str, ...]]]:
    """The modules that run each site's attention layers, and the sites each one runs.

    A site's stack is the owner of the outermost `nn.ModuleList` that holds all its attention modules (a Llama's
    `model`, T5's `encoder` and `decoder`, BART's `model.decoder`): every call that runs those layers, from the
    top-level model or from the backbone, passes through it exactly once. A model without such a list falls back to
    the top-level model.
    """
    paths = {id(module): name for name, module in model.named_modules()}
    stacks: dict[int, tuple[nn.Module, list[str]]] = {}
    for site in ("self", "cross", "encoder"):
        if site not in sites:
            continue
        names = [paths[id(module)] for module in sites[site].modules]
        stack, stack_name = model, ""
        parts = names[0].split(".")
        for depth in range(1, len(parts)):
            prefix = ".".join(parts[:depth])
            if isinstance(model.get_submodule(prefix), nn.ModuleList):
                if all(name.startswith(prefix + ".") for name in names):
                    stack_name = ".".join(parts[: depth - 1])
                    stack = model.get_submodule(stack_name) if stack_name else model
                break
        stacks.setdefault(id(stack), (stack, []))[1].append(site)
    return [(stack, tuple(found)) for stack, found in stacks.values()]


class PrefixPlusModel(BaseTuner):
    """Prefix tuning at the attention level, with distinct encoder, decoder and cross-attention prefixes.

    Created by `peft.get_peft_model` from a [`PrefixPlusConfig`]; not instantiated directly. The model's attention
    implementation is switched to a PrefixPlus wrapper of the same kind (eager or sdpa). Each attention call
    computes its layer's prefix from the adapter's parameters; a forward pre-hook on each attention stack only hands
    the pass's options (mixed-batch rows, the KV cache) down as a keyword argument. `unload()` restores the model
    exactly.

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
    #: During generation, write each prefix into the front of the KV cache once, so that every decoding step is the
    #: model's own attention call (see `peft_prefix_plus.tuner.kv_cache`). `False` attends the prefix and the cache apart.
    seeds_kv_cache: bool = True
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
            raise PrefixPlusValueError(f"PrefixPlusModel needs a PrefixPlusConfig, got {type(config).__name__}.")
        if adapter_name == "__base__":
            raise PrefixPlusValueError(
                "'__base__' is reserved: in `adapter_names` it marks the rows that get no prefix. Choose another "
                "adapter name."
            )
        sites = self._discover(model)
        lengths = config.site_lengths(self._is_encoder_decoder)
        self._check_config(config, sites, lengths)  # before anything in the model changes
        self._install(model, sites)
        site_layers = {
            site: list(layer_indices(len(found.modules), config.layers_to_transform)) for site, found in sites.items()
        }
        layer: PrefixPlusLayer = getattr(model, LAYER_ATTR)
        layer.update_layer(adapter_name, config, lengths, site_layers)
        # the text pass runs when an adapter is created, not when a saved one is loaded (its prefixes replace it, and
        # loading needs no tokenizer); an adapter created on the meta device (low_cpu_mem_usage) gets its weights later
        loaded = getattr(config, "_loaded", False) or config.merged_from
        if config.init_weights == "text" and not (loaded or low_cpu_mem_usage):
            initialise_from_text(model, self.call_options, layer, adapter_name, config)
        super().inject_adapter(
            model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, low_cpu_mem_usage=low_cpu_mem_usage
        )

    def _create_and_replace(self, *args: Any, **kwargs: Any) -> None:  # pragma: no cover - no module is replaced
        raise UnsupportedError("PrefixPlus replaces no module.")

    def _check_target_module_exists(self, *args: Any, **kwargs: Any) -> bool:
        return False

    def _discover(self, model: nn.Module) -> dict[str, AttentionSite]:
        """Find the attention sites of ``model`` (once per model) without changing the model."""
        if getattr(self, "_sites", None) is not None:
            return self._sites
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "_attn_implementation"):
            raise UnsupportedError(
                f"PrefixPlus needs a transformers model (PreTrainedModel), got {type(model).__name__}."
            )
        self._is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
        # a wrapped implementation alone is no sign of adapters: the config object may be shared with another model
        # that carries them (both then run PrefixPlus's attention, each with its own routes and prefixes)
        implementations = {
            UNWRAPPED_IMPLEMENTATIONS.get(c._attn_implementation, c._attn_implementation) for c in model_configs(model)
        }
        if hasattr(model, LAYER_ATTR) or any(has_route(module) for module in model.modules()):
            raise PrefixPlusValueError(
                f"This {type(model).__name__} already carries PrefixPlus adapters: it was passed to `get_peft_model` "
                "before (its attention is now PrefixPlus's). Add another adapter with "
                "`peft_model.add_adapter(name, config)`, or call `peft_model.unload()` first to get the base model back."
            )
        unsupported = implementations - set(WRAPPED_IMPLEMENTATIONS)
        if unsupported:
            raise UnsupportedError(
                f"PrefixPlus supports attn_implementation 'eager' and 'sdpa'; the model uses {sorted(unsupported)}. "
                "Load the model with attn_implementation='sdpa' (or 'eager')."
            )
        sites = discover_attention_sites(model)
        self._stack_sites = _attention_stacks(model, sites)
        # Each attention call gets its pass's `PrefixCall` as a keyword argument: from the stack's call where the
        # stack hands its keyword arguments down (transformers' `**kwargs` route; found by a probe pass), else from a
        # pre-hook on the attention module itself, whose forward must then take them
        self._delivered = stack_keywords_reach_attention(model, [stack for stack, _ in self._stack_sites])
        for found in sites.values():
            if all(id(module) in self._delivered for module in found.modules):
                continue
            closed = next((m for m in found.modules if not _takes_keywords(m)), None)
            if closed is not None:
                raise UnsupportedError(
                    f"{type(closed).__name__} of {type(model).__name__} computes attention through transformers' "
                    "AttentionInterface, but neither its stack nor its own forward passes keyword arguments on, so "
                    "PrefixPlus cannot hand its prefix to the attention call. Use another PEFT method for this model, "
                    "e.g. LoRA."
                )
        # real tokens' positions are shifted where the decoder-only stack takes them
        self._accepts_position_ids = any(
            "position_ids" in inspect.signature(stack.forward).parameters
            for stack, stack_sites in self._stack_sites
            if "self" in stack_sites
        )
        return sites

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
            device = execution_device(model, found.modules[0])
            if device.type != "meta":  # a meta-initialised model: the encoders stay where they are created
                layer.site_devices[site] = device
        # every config of the model (T5's encoder and decoder hold copies), checked before each pass: a later
        # `model.set_attn_implementation("eager")` must not silently drop the prefix
        self._configs = model_configs(model)
        for config in self._configs:
            wrap_attention_implementation(config)
        self._sites = sites
        # an instance attribute shadows transformers' method on this model only (its class is unchanged); every
        # continuous batching entry point calls `self.init_continuous_batching`, so all refuse before anything runs
        if hasattr(model, CONTINUOUS_BATCHING_ENTRY):
            setattr(model, CONTINUOUS_BATCHING_ENTRY, _refuse_continuous_batching)
        # Where the stack hands its keyword arguments down, the stack's pre-hook adds the `PrefixCall` once per pass;
        # elsewhere (Falcon) a pre-hook on each attention module does. Decoder self- and cross-attention whose own
        # code does not size a position bias from the cached keys seed their prefix into an empty generation cache at
        # their KV cache layer index.
        delivered = self._delivered
        self._hooks = []
        self._module_hooked = []
        seeds: dict[str, list[Seed]] = {}
        for site, found in sites.items():
            # Layers that reuse another layer's keys and values (Gemma 3n's `is_kv_shared_layer`) read them as the
            # other layer's cache update returned them: a seeded prefix would reach them as real keys. Such models
            # keep prefixes out of the cache, and every layer, a sharing one too, attends its own prefix.
            shares_kv = any(getattr(module, "is_kv_shared_layer", False) for module in found.modules)
            seeding = site in ("self", "cross") and not found.position_bias and not shares_kv
            by_stack = all(id(module) in delivered for module in found.modules)
            for index, module in enumerate(found.modules):
                cache_index = getattr(module, "layer_idx", None)
                seed = (site, index, cache_index) if seeding and isinstance(cache_index, int) else None
                if by_stack:
                    seeds.setdefault(site, []).extend([seed] if seed else [])
                    continue
                hook = partial(self._before_attention, (seed,) if seed else ())
                self._hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                self._module_hooked.append(module)
            if by_stack:
                seeds.setdefault(site, [])
        # Every entry point passes through each attention stack (the decoder, the encoder): its hook re-checks the
        # attention implementation, shifts position ids and hands down the `PrefixCall`. It keeps nothing; it only
        # rewrites the call's arguments.
        for stack, stack_sites in self._stack_sites:
            plan = StackPlan(
                sites=stack_sites,
                mask_positions=_positions_from_mask(stack),
                delivers=any(site in seeds for site in stack_sites),
                seeds=tuple(seed for site in stack_sites for seed in seeds.get(site, ())),
            )
            self._hooks.append(stack.register_forward_pre_hook(partial(self._before_stack, plan), with_kwargs=True))

    def _check_config(
        self, config: PrefixPlusConfig, sites: dict[str, AttentionSite], lengths: dict[str, int]
    ) -> None:
        model_type = getattr(self.model.config, "model_type", type(self.model).__name__)
        if not self._is_encoder_decoder:
            for name in ("encoder_num_virtual_tokens", "cross_num_virtual_tokens"):
                if getattr(config, name) is not None:
                    raise PrefixPlusConfigError(
                        f"`{name}` is set to {getattr(config, name)}, but {model_type!r} is not an encoder-decoder "
                        "model: it has no encoder self-attention or cross-attention. Leave it as None."
                    )
        elif config.offset_position_ids:
            raise PrefixPlusConfigError(
                f"`offset_position_ids=True` is supported for decoder-only models only; {model_type!r} is an "
                "encoder-decoder model. Leave it as False."
            )
        causal_lm = {"CAUSAL_LM": False, "SEQ_2_SEQ_LM": True}
        if config.task_type in causal_lm and causal_lm[config.task_type] != self._is_encoder_decoder:
            expected = "SEQ_2_SEQ_LM" if self._is_encoder_decoder else "CAUSAL_LM"
            kind = "an encoder-decoder" if self._is_encoder_decoder else "a decoder-only"
            raise PrefixPlusConfigError(
                f"`task_type={config.task_type!r}` does not fit {model_type!r}, which is {kind} model; use "
                f"`task_type={expected!r}`."
            )
        main_input = getattr(self.model, "main_input_name", "input_ids")
        if config.task_type in causal_lm and "input_ids" not in inspect.signature(self.model.forward).parameters:
            # PEFT's task wrappers (PeftModelForSeq2SeqLM, PeftModelForCausalLM) call the model with `input_ids=...`
            raise PrefixPlusConfigError(
                f"`task_type={config.task_type!r}` does not fit {model_type!r}, whose forward takes {main_input!r} "
                "and no `input_ids`: PEFT's task wrapper for it passes `input_ids`, which the model refuses. Leave "
                "`task_type` unset (None), as PEFT's own examples for Whisper do; the adapter works the same."
            )
        if config.offset_position_ids and not any(getattr(m, "is_causal", True) for m in sites["self"].modules):
            raise PrefixPlusConfigError(
                f"`offset_position_ids=True` is supported for decoder-only models only; {model_type!r} is an "
                "encoder-only model (its self-attention is not causal). Leave it as False."
            )
        if not any(length for site, length in lengths.items() if site in sites):
            warnings.warn(
                f"Every prefix length of this PrefixPlus adapter is 0 ({lengths}): it has nothing to train and "
                "leaves the model unchanged. Set `num_virtual_tokens` (and the encoder/cross lengths) above 0.",
                UserWarning,
                stacklevel=2,
            )
        if config.offset_position_ids and not self._accepts_position_ids:
            raise PrefixPlusConfigError(
                f"`offset_position_ids=True` needs a model whose forward takes `position_ids`; {model_type!r} does not."
            )
        if config.layers_to_transform is not None:
            for site, length in lengths.items():
                count = len(sites[site].modules) if site in sites else 0
                if length and max(config.layers_to_transform) >= count:
                    raise PrefixPlusConfigError(
                        f"`layers_to_transform` {config.layers_to_transform} is out of range: the '{site}' attention "
                        f"of {model_type!r} has {count} layers (valid indices 0 to {count - 1})."
                    )
        shapes = {site: site_shapes_entry(found.layer_shapes) for site, found in sites.items()}
        if config.site_shapes is not None:  # an adapter that was trained before: it must fit this model
            for site, length in lengths.items():
                if not length:
                    continue
                expected, actual = config.site_shapes.get(site), shapes.get(site)
                if expected is None or actual is None or site_layer_shapes(expected) != site_layer_shapes(actual):
                    raise PrefixPlusConfigError(
                        f"The adapter was made for a model whose '{site}' attention has {expected} (layers, key/value "
                        f"heads, head dimension), but this {model_type!r} model has {actual}. Load the adapter onto the "
                        "base model it was trained with."
                    )
        else:
            config.site_shapes = shapes
        if config.token_dim is None:
            # stock PEFT's MLP input width: the key/value width, which is the hidden size unless the model uses
            # grouped-query attention (a wider input acts like a higher learning rate)
            heads, key_dim, _ = (sites["self"] if "self" in sites else next(iter(sites.values()))).layer_shapes[0]
            config.token_dim = heads * key_dim

    # ------------------------------------------------------------------ forward
    @property
    def _layer(self) -> PrefixPlusLayer:
        return getattr(self.model, LAYER_ATTR)

    def _before_stack(self, plan: StackPlan, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Before one attention stack runs: keep PrefixPlus's attention, hand down the pass's `PrefixCall` (where the
        stack delivers keywords to its attention calls), shift the position ids if configured."""
        for config in self._configs:
            wrap_attention_implementation(config)  # a no-op unless the implementation was switched since
        layer = self._layer
        options = kwargs.get(OPTIONS_KWARG) or {}
        kwargs = {key: value for key, value in kwargs.items() if key != OPTIONS_KWARG}
        rows = self._rows_of(args, kwargs, options.get("adapter_names"))
        if plan.delivers:
            kwargs[CALL_KWARG] = self._prefix_call(options, rows, _cache_argument(kwargs), plan.seeds)
        if "self" not in plan.sites or self._is_encoder_decoder or layer.disable_adapters or options.get("disabled"):
            return args, kwargs
        self._check_cache_length(args, kwargs)
        if rows is not None:
            offsets = [layer.adapter_length(name, "self") if self._offsets(name) else 0 for name in rows]
            if any(offsets):
                kwargs = self._offset_position_ids(args, kwargs, torch.tensor(offsets)[:, None], plan.mask_positions)
        elif self._uses_position_offset():
            kwargs = self._offset_position_ids(args, kwargs, layer.active_length("self"), plan.mask_positions)
        return args, kwargs

    def _check_cache_length(self, args: tuple, kwargs: dict) -> None:
        """Refuse a cache whose length exceeds the attention mask's by the prefix length: a cache rebuilt from a seeded
        one, whose prefix would be read as tokens (a seeded cache leaves its prefix out of its length)."""
        cache, mask = _cache_argument(kwargs), kwargs.get("attention_mask")
        if cache is None or not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            return
        tokens = kwargs.get("input_ids", args[0] if args else None)
        tokens = kwargs.get("inputs_embeds") if tokens is None else tokens
        extra = cache.get_seq_length() + tokens.shape[1] - mask.shape[-1] if tokens is not None else 0
        if extra > 0 and extra == self._layer.active_length("self"):
            raise PrefixPlusValueError(REBUILT_CACHE_MESSAGE.format(extra=extra))

    def _before_attention(
        self, seeds: tuple[Seed, ...], module: nn.Module, args: tuple, kwargs: dict
    ) -> tuple[tuple, dict]:
        """Hand this call's `PrefixCall` to the attention function of a module whose stack does not deliver it."""
        options = kwargs.get(OPTIONS_KWARG) or {}
        cache = next((value for value in (*kwargs.values(), *args) if isinstance(value, Cache)), None)
        hidden = args[0] if args else kwargs.get("hidden_states")
        rows = self._rows_of((hidden,), {}, options.get("adapter_names"))
        kwargs = {key: value for key, value in kwargs.items() if key != OPTIONS_KWARG}
        kwargs[CALL_KWARG] = self._prefix_call(options, rows, cache, seeds)
        return args, kwargs

    def _prefix_call(
        self, options: dict, rows: Optional[tuple[str, ...]], cache: Any, seeds: tuple[Seed, ...]
    ) -> PrefixCall:
        """This call's `PrefixCall`; first, the empty generation cache layers of ``seeds`` get their prefix, and a
        cache seeded by another model is refused (before any module writes to it, so it stays usable by its own)."""
        call = PrefixCall(
            rows=rows, cache=cache, disabled=options.get("disabled", False), capture=options.get("capture")
        )
        if cache is None or not seeds:
            return call
        layer = self._layer
        seeding = self.seeds_kv_cache and not call.disabled and not torch.is_grad_enabled()
        for site, index, cache_index in seeds:
            found = cache_layer(cache, site, cache_index)
            if isinstance(found, PrefixedCacheLayer):
                if found.owner is not layer.cache_owner:
                    raise PrefixPlusValueError(FOREIGN_CACHE_MESSAGE)
            elif seeding and (found is None or (type(found) is DynamicLayer and not found.is_initialized)):
                prefix = layer.prefix_for(site, index, rows)
                if prefix is not None:
                    seed_prefix_cache(
                        cache,
                        [(site, cache_index, prefix[:2])],
                        owner=layer.cache_owner,
                        state=layer.prefix_state(rows),
                    )
        return call

    @staticmethod
    def _rows_of(args: tuple, kwargs: dict, names: Optional[list[str]]) -> Optional[tuple[str, ...]]:
        """The adapter of each input row while a call with ``adapter_names`` runs, expanded as `generate` expands
        the batch (beams, ``num_return_sequences``: each row repeated in place)."""
        if names is None:
            return None
        tokens = kwargs.get("input_ids", args[0] if args else None)
        for name in ("inputs_embeds", "hidden_states"):  # a stack may take embeddings or hidden states instead
            tokens = kwargs.get(name) if tokens is None else tokens
        if not isinstance(tokens, torch.Tensor):
            return tuple(names)
        batch = tokens.shape[0]
        if batch % len(names):
            raise PrefixPlusValueError(
                f"`adapter_names` has {len(names)} entries, but the batch has {batch} rows; pass one adapter name "
                "per input row."
            )
        return tuple(name for name in names for _ in range(batch // len(names)))

    def _offsets(self, adapter_name: str) -> bool:
        return adapter_name in self.peft_config and self.peft_config[adapter_name].offset_position_ids

    @contextmanager
    def _enable_peft_forward_hooks(self, *args: Any, **kwargs: Any):
        """Serve a batch that mixes adapters: ``adapter_names`` gives one adapter per input row, as for LoRA.

        Each row attends to its own adapter's prefix (``"__base__"``: none); adapters of different lengths are
        padded with prefix columns that no query attends to. PEFT calls this around `forward` and `generate`.
        """
        adapter_names = kwargs.pop("adapter_names", None)
        if adapter_names is None:
            yield
            return
        if self.training:
            raise PrefixPlusValueError(
                "Cannot pass `adapter_names` when the model is in training mode; call `model.eval()`."
            )
        if isinstance(adapter_names, str) or not all(isinstance(name, str) for name in adapter_names):
            raise PrefixPlusTypeError(
                f"`adapter_names` must be a list of adapter names, one per row; got {adapter_names!r}."
            )
        unknown = sorted({name for name in adapter_names if name != "__base__"} - set(self.peft_config))
        if unknown:
            raise PrefixPlusValueError(
                f"Trying to infer with non-existing adapter(s): {', '.join(unknown)}. Loaded adapters: "
                f"{sorted(self.peft_config)}; use '__base__' for rows that should get no prefix."
            )
        if not adapter_names:
            raise PrefixPlusValueError("`adapter_names` is empty; pass one adapter name per input row.")
        # modules_to_save (e.g. a classification head): each row goes through its own adapter's copy, as in LoRA
        handles = [
            module.register_forward_pre_hook(partial(_saved_module_rows, names=list(adapter_names)), with_kwargs=True)
            for module in self.model.modules()
            if isinstance(module, AuxiliaryTrainingWrapper)
        ]
        try:
            with self.call_options(adapter_names=list(adapter_names)):
                yield
        finally:
            for handle in handles:
                handle.remove()

    @contextmanager
    def call_options(self, **options: Any):
        """Pass ``options`` (`PrefixCall` fields: ``adapter_names``, ``disabled``, ``capture``) to every forward pass
        of the attention stacks run inside the block, as a keyword argument, as LoRA passes ``adapter_names``.

        Example:

        ```py
        >>> captured = {}
        >>> with peft_model.base_model.call_options(disabled=True, capture=captured):
        ...     peft_model(input_ids)
        ```
        """

        def add_options(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return args, {**kwargs, OPTIONS_KWARG: options}

        modules = [stack for stack, _ in self._stack_sites] + self._module_hooked
        handles = [module.register_forward_pre_hook(add_options, with_kwargs=True, prepend=True) for module in modules]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _uses_position_offset(self) -> bool:
        layer = self._layer
        return not layer.disable_adapters and any(
            self.peft_config[name].offset_position_ids for name in layer.active_adapters if name in self.peft_config
        )

    @staticmethod
    def _offset_position_ids(
        args: tuple, kwargs: dict, length: Union[int, torch.Tensor], mask_positions: bool
    ) -> dict:
        """Shift real tokens' position ids by the prefix length (per row: a ``(batch, 1)`` tensor), as stock PEFT's
        past_key_values route does.

        Positions the caller passes (`generate` derives them from the attention mask) are shifted. Without them, the
        positions the stack itself would compute are shifted: from the attention mask where its code derives them so
        (``mask_positions``: OPT, BioGPT), else ``past .. past + length - 1``.
        """
        if isinstance(length, int) and not length:
            return kwargs
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            tokens = kwargs.get("input_ids", args[0] if args else None)
            if tokens is None:
                tokens = kwargs["inputs_embeds"]
            cache = _cache_argument(kwargs)
            past = cache.get_seq_length() if cache is not None else 0
            mask = kwargs.get("attention_mask")
            if mask_positions and isinstance(mask, torch.Tensor) and mask.dim() == 2:
                position_ids = ((mask.cumsum(dim=1) * mask) - 1).long()[:, past:]
            else:
                position_ids = torch.arange(past, past + tokens.shape[1], device=tokens.device).unsqueeze(0)
        if isinstance(length, torch.Tensor):
            length = length.to(position_ids.device)
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
        if adapter_names is None:
            names = list(self.active_adapters)
        elif isinstance(adapter_names, str):
            names = [adapter_names]
        else:
            names = list(adapter_names)
        layer = self._layer
        unknown = [name for name in names if name not in self.peft_config or name not in layer.prefix_plus_sites]
        if unknown:
            raise PrefixPlusValueError(
                f"No PrefixPlus adapter named {unknown}; the model has {sorted(layer.prefix_plus_sites.keys())}."
            )
        merged = []
        for name in names:
            config: PrefixPlusConfig = self.peft_config[name]
            if not merge_site_encoders(layer.prefix_plus_sites[name].values()):
                warnings.warn(
                    f"PrefixPlus adapter {name!r} already holds raw prefixes (prefix_projection=False): "
                    "there is no MLP to merge, nothing was changed.",
                    UserWarning,
                    stacklevel=2,
                )
                continue
            # a copy: PEFT keeps the config object the caller passed, which may configure other models too
            config = copy.deepcopy(config)
            mark_config_merged(config)
            self.peft_config[name] = config
            merged.append(name)
        return merged

    def delete_adapter(self, adapter_name: str) -> None:
        """Delete the adapter ``adapter_name``; if it was active, the first remaining adapter becomes active.

        Args:
            adapter_name (`str`): Name of the adapter to delete.
        """
        if adapter_name not in self.peft_config:
            raise PrefixPlusValueError(
                f"Adapter {adapter_name!r} does not exist; adapters: {sorted(self.peft_config)}."
            )
        del self.peft_config[adapter_name]
        # PEFT's generic deletion skips modules whose name contains the method prefix, as ours does
        layer = self._layer
        layer.delete_adapter(adapter_name)
        self.active_adapter = layer.active_adapters[:]
        _delete_auxiliary_adapter(self.model, adapter_name, new_active_adapters=self.active_adapter)

    def add_weighted_adapter(self, *args: Any, **kwargs: Any) -> None:
        """Refused: prefixes are attended, not added, so a weighted sum of two adapters' keys and values means nothing.

        Raises:
            ValueError: Always, naming the way to combine adapters: activate several at once.
        """
        raise UnsupportedError(
            "`add_weighted_adapter` is not supported for PrefixPlus adapters: a prefix is a set of extra keys and "
            "values that attention reads, and a weighted sum of two prefixes is not a combination of what they do. "
            "To use several adapters together, activate them at once, e.g. "
            "`peft_model.base_model.set_adapter(['a', 'b'])`: their prefixes are concatenated at every layer."
        )

    def foreign_adapter_modules(self) -> list[str]:
        """The modules that carry another PEFT method's adapter layers (e.g. LoRA put in by
        `inject_adapter_in_model`), whose weights PrefixPlus's `save_pretrained` does not write."""
        return [
            name
            for name, module in self.model.named_modules()
            if isinstance(module, BaseTunerLayer) and not isinstance(module, PrefixPlusLayer)
        ]

    def merge_adapter(self, *args: Any, **kwargs: Any) -> None:
        raise UnsupportedError(MERGE_INTO_WEIGHTS_MESSAGE)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        raise UnsupportedError(MERGE_INTO_WEIGHTS_MESSAGE)

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
            unwrap_attention_implementations(model)
        for name, module in list(model.named_modules()):  # modules_to_save: put the base model's own module back
            if isinstance(module, AuxiliaryTrainingWrapper):
                parent, _, target_name = _get_submodules(model, name)
                setattr(parent, target_name, module.original_module)
        if model.__dict__.get(CONTINUOUS_BATCHING_ENTRY) is _refuse_continuous_batching:
            delattr(model, CONTINUOUS_BATCHING_ENTRY)  # transformers' own method again
        if hasattr(model, LAYER_ATTR):
            getattr(model, LAYER_ATTR).cache_owner.unloaded = True
            delattr(model, LAYER_ATTR)
        if hasattr(model, "peft_config"):
            del model.peft_config
        self._sites = None
        return model

    @classmethod
    def _remap_adapter_state_dict_for_load(
        cls, model: nn.Module, config: PrefixPlusConfig, adapter_name: str, state_dict: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """PEFT's key remapping at load, preceded by the check that the saved tensors match the adapter's config."""
        foreign = [
            key
            for key in state_dict
            if f"{LAYER_ATTR}." not in key and not is_modules_to_save_key(key, config.modules_to_save)
        ]
        if foreign:
            raise AdapterFileError(
                f"The saved weights of PrefixPlus adapter {adapter_name!r} hold tensors that are neither PrefixPlus "
                f"tensors nor `modules_to_save` copies: {foreign[:5]}. Loading them would overwrite the base model's "
                "weights; remove them from adapter_model.safetensors, or declare their modules in `modules_to_save`."
            )
        layer = next((m for m in model.modules() if isinstance(m, PrefixPlusLayer)), None)
        if layer is not None and adapter_name in layer.prefix_plus_sites:
            found = {key.split(KEY_MARKER, 1)[1]: t for key, t in state_dict.items() if KEY_MARKER in key}
            layer.check_saved_weights(adapter_name, found)
        return super()._remap_adapter_state_dict_for_load(
            model=model, config=config, adapter_name=adapter_name, state_dict=state_dict
        )

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        # keys look like "...prefix_plus_layer.prefix_plus_sites.<adapter>.<site>.mlp.0.weight"
        marker = f".{SITES_ATTR}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f".{SITES_ATTR}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)

    def _prepare_adapter_config(self, peft_config: PrefixPlusConfig, model_config: dict) -> PrefixPlusConfig:
        return peft_config


def _saved_module_rows(module: nn.Module, args: tuple, kwargs: dict, names: list[str]) -> tuple[tuple, dict]:
    """Give a `modules_to_save` wrapper one adapter name per row of its input (rows repeated as `generate` expands
    the batch); PEFT's wrapper then runs each row through that adapter's copy of the module."""
    rows = args[0].shape[0] if args and isinstance(args[0], torch.Tensor) else len(names)
    if rows % len(names):
        return args, {**kwargs, "adapter_names": names}  # the wrapper names the mismatch
    return args, {**kwargs, "adapter_names": [name for name in names for _ in range(rows // len(names))]}


def _positions_from_mask(stack: nn.Module) -> bool:
    """Whether ``stack`` derives position ids from the attention mask when none are passed (OPT's decoder and
    BioGPT's position embedding take a running count of the mask), as read from the source of its forward and of its
    position embedding: PrefixPlus must shift the same positions."""
    modules = [stack, *(module for name, module in stack.named_children() if "pos" in name)]
    for module in modules:
        try:
            source = inspect.getsource(type(module).forward)
        except (OSError, TypeError):
            continue
        if "cumsum(" in source and "attention_mask" in source:
            return True
    return False


def _cache_argument(kwargs: dict) -> Any:
    """The KV cache passed to a transformers forward (`cache` in transformers 5, `past_key_values` before)."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _takes_keywords(module: nn.Module) -> bool:
    """Whether ``module``'s forward takes arbitrary keyword arguments (``**kwargs``)."""
    parameters = inspect.signature(module.forward).parameters.values()
    return any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters)

"""Finding a model's attention sites: a probe pass through a copy of the model on the meta device.

Which modules are attention layers, and which site (encoder self-, decoder self- or cross-attention) each one
belongs to, is found by :func:`discover_attention_sites`: one tiny forward pass that records every call made through
transformers' ``AttentionInterface``. The pass runs on a structural copy of the model whose parameters and buffers
are meta tensors, so it computes nothing, reads no weight (disk-offloaded, `cpu_offload`ed and meta-initialised
models work alike) and changes nothing on the model itself, not even its config.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from ..errors import UnsupportedError
from .attention import _eager_function, model_configs

_PROBE = "prefix_plus_probe"
#: Attribute through which each module of the probe copy reaches the probe's call log.
_PROBE_LOG_ATTR = "_prefix_plus_probe_log"
#: accelerate's hook attributes: a probe copy runs its modules' own forward, with no weights to load or move
_ACCELERATE_ATTRS = ("_hf_hook", "_old_forward", "forward")


@dataclass
class AttentionSite:
    """The attention modules of one site, in layer order, and their key/value geometry."""

    modules: list[nn.Module] = field(default_factory=list)
    #: ``(key/value heads, key dim, value dim)`` of each module's attention call
    layer_shapes: list[tuple[int, int, int]] = field(default_factory=list)
    #: whether the modules pass a ``position_bias`` (T5), which their own code sizes from the cached keys
    position_bias: bool = False


#: Keyword argument that the probe adds to a stack's call, to see whether the stack hands it to its attention calls.
_PROBE_MARKER = "prefix_plus_probe_marker"


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    biased = kwargs.get("position_bias") is not None
    marked = kwargs.pop(_PROBE_MARKER, False)
    getattr(module, _PROBE_LOG_ATTR).append(
        (module, query.shape[2], key.shape[2], (key.shape[1], key.shape[3], value.shape[3]), biased, marked)
    )
    return _eager_function(module)(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(_PROBE, _probe_attention)
AttentionMaskInterface.register(_PROBE, eager_mask)


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose parameters and buffers are meta tensors of the same shapes and dtypes.

    Nothing is computed or read: offloaded weights stay where they are, and accelerate's hooks (which would load
    them) are left out of the copy.
    """
    memo: dict[int, Any] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        if id(param) not in memo:
            memo[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
    for _, buffer in model.named_buffers(remove_duplicate=False):
        memo.setdefault(id(buffer), torch.empty_like(buffer, device="meta"))
    hooked = []
    for module in model.modules():
        found = (
            [name for name in _ACCELERATE_ATTRS if name in module.__dict__] if "_hf_hook" in module.__dict__ else []
        )
        for name in found:
            memo[id(module.__dict__[name])] = None
        hooked.append(found)
    copied = copy.deepcopy(model, memo)
    for module, found in zip(copied.modules(), hooked, strict=True):
        for name in found:
            del module.__dict__[name]
    return copied


def execution_device(model: nn.Module, module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its accelerate hook's execution device (offloaded weights sit on "meta"
    between calls), or its first parameter's device."""
    paths = {id(m): name for name, m in model.named_modules()}
    name = paths.get(id(module), "")
    parts = name.split(".") if name else []
    for depth in range(len(parts), -1, -1):  # the module itself, then its parents
        hook = getattr(model.get_submodule(".".join(parts[:depth])), "_hf_hook", None)
        for single in getattr(hook, "hooks", (hook,)):
            device = getattr(single, "execution_device", None)
            if device is not None:
                return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    parameter = next(module.parameters(), None)
    if parameter is None or parameter.is_meta:
        parameter = next((p for p in model.parameters() if not p.is_meta), None)
    return parameter.device if parameter is not None else torch.device("cpu")


#: Length of the probe's text input: the encoder's tokens (encoder-decoder models) and the decoder's.
_ENCODER_TOKENS = 5
_DECODER_TOKENS = 3


def probe_inputs(model: nn.Module) -> tuple[dict[str, torch.Tensor], int]:
    """The meta-tensor inputs of the probe pass, built from the model's main input, and the number of positions the
    encoder attends over (0 for a model without an encoder).

    Text models get ``input_ids``; Whisper-style speech encoders (``main_input_name == "input_features"``, a config
    with ``num_mel_bins`` and ``max_source_positions``) get the one input length they accept, ``max_source_positions``
    times the strides of their convolutions, and attend over ``max_source_positions`` positions. Encoder-decoder
    models also get ``decoder_input_ids``, of a length that differs from the encoder's, so that cross-attention calls
    are told apart by their key length.

    Raises:
        UnsupportedError: If the model's main input is neither token ids nor Whisper-style log-mel features.
    """
    config = model.config
    is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    main_input = getattr(model, "main_input_name", "input_ids")
    vocab = getattr(config, "vocab_size", None) or 2
    token = min(1, vocab - 1)
    if main_input == "input_ids":
        encoder_length = _ENCODER_TOKENS if is_encoder_decoder else 0
        length = _ENCODER_TOKENS if is_encoder_decoder else _DECODER_TOKENS
        inputs = {"input_ids": torch.full((1, length), token, device="meta")}
    elif main_input == "input_features" and all(
        isinstance(getattr(config, name, None), int) for name in ("num_mel_bins", "max_source_positions")
    ):
        encoder = model.get_encoder() if hasattr(model, "get_encoder") else model
        frames = config.max_source_positions
        for conv in encoder.children():
            if isinstance(conv, nn.Conv1d):
                frames *= conv.stride[0]
        encoder_length = config.max_source_positions
        dtype = getattr(model, "dtype", torch.float32)
        inputs = {"input_features": torch.zeros((1, config.num_mel_bins, frames), dtype=dtype, device="meta")}
    else:
        raise UnsupportedError(
            f"PrefixPlus cannot build an input for its probe pass through {type(model).__name__}: its main input is "
            f"{main_input!r}. Supported are models that take token ids (`input_ids`: text models, and vision-language "
            "models, whose language model gets the prefixes) and Whisper-style speech models (`input_features`, with "
            "`num_mel_bins` and `max_source_positions` in the config)."
        )
    if is_encoder_decoder:
        start = getattr(config, "decoder_start_token_id", None)
        length = _DECODER_TOKENS if encoder_length != _DECODER_TOKENS else _DECODER_TOKENS - 1
        inputs["decoder_input_ids"] = torch.full((1, length), token if start is None else start, device="meta")
    return inputs, encoder_length


def _probe(
    model: nn.Module, inputs: dict[str, torch.Tensor], marked_stacks: tuple[nn.Module, ...] = ()
) -> list[tuple]:
    """Run the probe pass on a meta copy of ``model`` with ``inputs`` (see `probe_inputs`); each call made through the
    interface is logged as ``(module of model, query length, key length, (key/value heads, key dim, value dim),
    position bias, marked)``.

    ``marked``: whether the call received the keyword argument added to the calls of ``marked_stacks``.

    Meta tensors have shapes but no values, and a few models read values on the way. The pass is tried in up to three
    forms, and the first failure is raised if none runs:

    1. no attention mask, and no ``pad_token_id`` (models that look for padding in the token ids read values);
    2. a mask of ones: given none, some models (PaliGemma) look for packed sequences in their position ids, while
       others (T5, BART, BERT) read the values of a mask they are given, so the mask is only the second try;
    3. the config's own ``pad_token_id``, which some configs require (LED, T5Gemma, Emu3).
    """
    tries = [(inputs, False)]
    if "input_ids" in inputs and "attention_mask" not in inputs:
        tries.append(({**inputs, "attention_mask": torch.ones_like(inputs["input_ids"])}, False))
    tries.append((inputs, True))
    first = None
    for attempt, keep_pad in tries:
        try:
            return _probe_pass(model, attempt, marked_stacks, keep_pad)
        except Exception as error:  # noqa: BLE001 - the next form is tried; the first failure is reported
            first = first or error
    raise first


def _probe_pass(
    model: nn.Module, inputs: dict[str, torch.Tensor], marked_stacks: tuple[nn.Module, ...], keep_pad: bool
) -> list[tuple]:
    """One probe pass (see `_probe`); ``keep_pad``: leave the config's ``pad_token_id`` as it is."""
    probe = meta_copy(model)
    originals = dict(zip(map(id, probe.modules()), model.modules(), strict=True))
    calls: list[tuple] = []
    for module in probe.modules():
        object.__setattr__(module, _PROBE_LOG_ATTR, calls)
    for probe_config in model_configs(probe):  # the copy's own configs
        probe_config._attn_implementation = _PROBE
        if getattr(probe_config, "_experts_implementation", None) is not None:
            # mixture-of-experts layers: on meta tensors, torch's grouped_mm accepts bfloat16 only and the eager
            # experts' routing (nonzero) depends on values; batched_mm computes every expert, shapes only
            probe_config._experts_implementation = "batched_mm"
        if not keep_pad and getattr(probe_config, "pad_token_id", None) is not None:
            probe_config.pad_token_id = None  # its padding check reads token values, which meta tensors do not have
    marked = {id(stack) for stack in marked_stacks}
    for copied in probe.modules():
        if id(originals[id(copied)]) in marked:
            copied.register_forward_pre_hook(
                lambda module, args, kwargs: (args, {**kwargs, _PROBE_MARKER: True}), with_kwargs=True
            )
    # eval mode without `eval()`: transformers' `train()` re-kernelizes a model loaded with the `kernels` package (the
    # default since 5.25) when the mode changes, and `kernelize` refuses the meta device
    for module in probe.modules():
        module.training = False
    with torch.no_grad():
        probe(**inputs)
    return [(originals[id(call[0])], *call[1:]) for call in calls]


def _language_model(model: nn.Module) -> Optional[set[int]]:
    """The modules (by ``id``) of a decoder-only model's language model: what ``model.get_decoder()`` names (the
    ``language_model`` of a vision-language model), or ``None`` where it names the whole model or nothing."""
    get_decoder = getattr(model, "get_decoder", None)
    try:
        decoder = get_decoder() if callable(get_decoder) else None
    except Exception:  # noqa: BLE001 - transformers' lookup raises for models it has no rule for
        return None
    if not isinstance(decoder, nn.Module) or decoder is model:
        return None
    return {id(module) for module in decoder.modules()}


def discover_attention_sites(model: nn.Module) -> dict[str, AttentionSite]:
    """Find the attention modules of ``model`` and sort them into sites, with one probe pass on the meta device.

    The pass feeds the encoder and the decoder inputs of different lengths (see `probe_inputs`), so a call whose
    query has the encoder's length is encoder self-attention and a decoder call whose keys have it is
    cross-attention. Only the language model's attention gets a site: calls from modules outside the module that
    `model.get_decoder()` names for a decoder-only model (e.g. the vision tower of a vision-language model, which the
    probe's text input does not run anyway) are left out.

    Args:
        model (`nn.Module`): A transformers model, with its weights anywhere (also "meta" or offloaded).

    Returns:
        `dict[str, AttentionSite]`: ``"self"`` (decoder-only or encoder-only self-attention, or decoder
        self-attention), and for encoder-decoder models ``"encoder"`` and ``"cross"``.

    Raises:
        UnsupportedError: If the model takes an input the probe cannot build, the probe pass fails, or no attention
            call goes through transformers' AttentionInterface.

    Example:

    ```py
    >>> sites = discover_attention_sites(LlamaForCausalLM(LlamaConfig(num_hidden_layers=2)))
    >>> len(sites["self"].modules)
    2
    ```
    """
    model_type = getattr(model.config, "model_type", type(model).__name__)
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    inputs, encoder_length = probe_inputs(model)
    try:
        calls = _probe(model, inputs)
    except Exception as error:  # noqa: BLE001 - re-raised with the model type named
        raise UnsupportedError(
            f"PrefixPlus could not run its probe forward pass (on the meta device) through {type(model).__name__} "
            f"(model_type={model_type!r}) to find its attention layers: {type(error).__name__}: {error}"
        ) from error
    language_model = _language_model(model) if not is_encoder_decoder else None
    if language_model is not None:  # a best-effort lookup: one that holds no attention call restricts nothing
        calls = [call for call in calls if id(call[0]) in language_model] or calls
    found, seen = [], set()
    for call in calls:
        if id(call[0]) not in seen:  # a module called twice (e.g. shared layers) counts once
            seen.add(id(call[0]))
            found.append(call)
    if not found:
        raise UnsupportedError(
            f"Model type {model_type!r} does not compute attention through transformers' AttentionInterface, so "
            "PrefixPlus cannot inject prefixes into it. Supported are models whose attention calls "
            "`ALL_ATTENTION_FUNCTIONS.get_interface(...)`, e.g. Llama, Mistral, Qwen2, GPT-2, OPT, T5, BART and BERT; "
            "see the README's table of tested families. For this model, use another PEFT method, e.g. LoRA "
            "(`peft.LoraConfig`), which adapts its linear layers."
        )
    sites: dict[str, AttentionSite] = {}
    for module, q_len, k_len, layer_shape, biased, _ in found:
        if not is_encoder_decoder:
            name = "self"
        elif q_len == encoder_length:
            name = "encoder"
        else:
            name = "cross" if k_len == encoder_length else "self"
        site = sites.setdefault(name, AttentionSite())
        site.modules.append(module)
        site.layer_shapes.append(tuple(int(size) for size in layer_shape))
        site.position_bias = site.position_bias or biased
    return sites


def stack_keywords_reach_attention(model: nn.Module, stacks: list[nn.Module]) -> set[int]:
    """The attention modules (by ``id``) whose attention function receives a keyword argument given to the call of
    the stack that runs them (transformers' `**kwargs` route, which Llama, T5 or BART follow and Falcon does not).

    Found with a second probe pass; a stack whose forward refuses an unknown keyword argument delivers to none.
    """
    try:
        calls = _probe(model, probe_inputs(model)[0], tuple(stacks))
    except Exception:  # noqa: BLE001 - a stack that does not take **kwargs
        return set()
    delivered = {id(call[0]) for call in calls if call[-1]}
    missed = {id(call[0]) for call in calls if not call[-1]}
    return delivered - missed  # a module called several times must get the keyword every time

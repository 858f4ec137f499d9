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
from typing import Any

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
    num_key_value_heads: int = 0
    head_dim: int = 0
    #: whether the modules pass a ``position_bias`` (T5), which their own code sizes from the cached keys
    position_bias: bool = False


#: Keyword argument that the probe adds to a stack's call, to see whether the stack hands it to its attention calls.
_PROBE_MARKER = "prefix_plus_probe_marker"


def _probe_attention(module, query, key, value, attention_mask, **kwargs):
    biased = kwargs.get("position_bias") is not None
    marked = kwargs.pop(_PROBE_MARKER, False)
    getattr(module, _PROBE_LOG_ATTR).append(
        (module, query.shape[2], key.shape[2], key.shape[1], key.shape[3], biased, marked)
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


def _probe(model: nn.Module, marked_stacks: tuple[nn.Module, ...] = ()) -> list[tuple]:
    """Run the probe pass on a meta copy of ``model``; each call made through the interface is logged as
    ``(module of model, query length, key length, key/value heads, head dim, position bias, marked)``.

    ``marked``: whether the call received the keyword argument added to the calls of ``marked_stacks``.
    """
    config = model.config
    is_encoder_decoder = bool(getattr(config, "is_encoder_decoder", False))
    probe = meta_copy(model)
    originals = dict(zip(map(id, probe.modules()), model.modules(), strict=True))
    calls: list[tuple] = []
    for module in probe.modules():
        object.__setattr__(module, _PROBE_LOG_ATTR, calls)
    for probe_config in model_configs(probe):  # the copy's own configs
        probe_config._attn_implementation = _PROBE
        if getattr(probe_config, "pad_token_id", None) is not None:
            probe_config.pad_token_id = None  # its padding check reads token values, which meta tensors do not have
    marked = {id(stack) for stack in marked_stacks}
    for copied in probe.modules():
        if id(originals[id(copied)]) in marked:
            copied.register_forward_pre_hook(
                lambda module, args, kwargs: (args, {**kwargs, _PROBE_MARKER: True}), with_kwargs=True
            )
    vocab = getattr(config, "vocab_size", None) or 2
    token = min(1, vocab - 1)
    inputs = {"input_ids": torch.full((1, 5 if is_encoder_decoder else 3), token, device="meta")}
    if is_encoder_decoder:
        start = getattr(config, "decoder_start_token_id", None)
        inputs["decoder_input_ids"] = torch.full((1, 3), token if start is None else start, device="meta")
    with torch.no_grad():
        probe.eval()(**inputs)
    return [(originals[id(call[0])], *call[1:]) for call in calls]


def discover_attention_sites(model: nn.Module) -> dict[str, AttentionSite]:
    """Find the attention modules of ``model`` and sort them into sites, with one probe pass on the meta device.

    The pass feeds 5 encoder tokens and 3 decoder tokens, so a call whose query has 5 positions is encoder
    self-attention and a decoder call whose keys have 5 positions is cross-attention.

    Args:
        model (`nn.Module`): A transformers model, with its weights anywhere (also "meta" or offloaded).

    Returns:
        `dict[str, AttentionSite]`: ``"self"`` (decoder-only or encoder-only self-attention, or decoder
        self-attention), and for encoder-decoder models ``"encoder"`` and ``"cross"``.

    Raises:
        ValueError: If the probe pass fails, or no attention call goes through transformers' AttentionInterface.

    Example:

    ```py
    >>> sites = discover_attention_sites(LlamaForCausalLM(LlamaConfig(num_hidden_layers=2)))
    >>> len(sites["self"].modules)
    2
    ```
    """
    model_type = getattr(model.config, "model_type", type(model).__name__)
    is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    try:
        calls = _probe(model)
    except Exception as error:  # noqa: BLE001 - re-raised with the model type named
        raise UnsupportedError(
            f"PrefixPlus could not run its probe forward pass (on the meta device) through {type(model).__name__} "
            f"(model_type={model_type!r}) to find its attention layers: {type(error).__name__}: {error}"
        ) from error
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
            "see the README's table of tested families."
        )
    sites: dict[str, AttentionSite] = {}
    for module, q_len, k_len, heads, head_dim, biased, _ in found:
        if not is_encoder_decoder:
            name = "self"
        elif q_len == 5:
            name = "encoder"
        else:
            name = "cross" if k_len == 5 else "self"
        site = sites.setdefault(name, AttentionSite(num_key_value_heads=heads, head_dim=head_dim))
        if (heads, head_dim) != (site.num_key_value_heads, site.head_dim):
            raise UnsupportedError(
                f"Attention layers of the '{name}' site of {type(model).__name__} differ in key/value heads or head "
                "dimension; PrefixPlus supports models whose layers share one attention geometry per site."
            )
        site.modules.append(module)
        site.position_bias = site.position_bias or biased
    return sites


def stack_keywords_reach_attention(model: nn.Module, stacks: list[nn.Module]) -> set[int]:
    """The attention modules (by ``id``) whose attention function receives a keyword argument given to the call of
    the stack that runs them (transformers' `**kwargs` route, which Llama, T5 or BART follow and Falcon does not).

    Found with a second probe pass; a stack whose forward refuses an unknown keyword argument delivers to none.
    """
    try:
        calls = _probe(model, tuple(stacks))
    except Exception:  # noqa: BLE001 - a stack that does not take **kwargs
        return set()
    delivered = {id(call[0]) for call in calls if call[-1]}
    missed = {id(call[0]) for call in calls if not call[-1]}
    return delivered - missed  # a module called several times must get the keyword every time

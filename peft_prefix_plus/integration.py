"""Everything PrefixPlus changes in PEFT and transformers, in one place.

`install` makes these global changes, once (it is idempotent), when ``peft_prefix_plus`` and ``peft`` are both
imported (see :mod:`peft_prefix_plus.deferred_registration` for when exactly):

1. ``PeftType.PREFIX_PLUS``: PEFT only accepts methods whose name is a member of its `PeftType` enum, and Python
   offers no public API to add a member to an existing ``Enum``; `add_peft_type_member` does by hand what
   ``EnumType`` does when it builds one.
2. ``register_peft_method``: the config and tuner classes that `get_peft_model`, `PeftModel.from_pretrained` and the
   ``AutoPeftModel*`` classes look up by type.
3. The attention implementations (``prefix_plus_eager``, ``prefix_plus_sdpa``) in transformers'
   ``AttentionInterface`` and ``AttentionMaskInterface``, so that a model unpickled in a fresh process finds them.
4. Four methods of `peft.PeftModel`, each of which runs the stock method unchanged for every other adapter type
   (PEFT offers plugins no hook for any of them):

   - ``from_pretrained`` and ``load_adapter`` validate a local PrefixPlus adapter from its config and safetensors
     header (`peft_prefix_plus.files.check_prefix_plus_adapter`) before anything is built, so a corrupt or
     mismatched file is refused before the base model is touched; ``load_adapter`` also refuses PrefixPlus tensors
     loaded under another ``peft_type``, which would otherwise load as an adapter that changes nothing;
   - ``push_to_hub`` runs `peft_prefix_plus.push_adapter` (the stock method, from transformers' ``PushToHubMixin``,
     replaces the card of a new repository with a plain transformers card);
   - ``create_or_update_model_card``, which ``save_pretrained`` calls, runs PEFT's writer and adds the PrefixPlus
     section of the model card.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Any

from peft import PeftModel
from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import SAFETENSORS_WEIGHTS_NAME, PeftType, register_peft_method

from .errors import AdapterFileError, PrefixPlusTypeError, PrefixPlusValueError
from .files import card
from .files.read import check_prefix_plus_adapter, read_config_dict, read_tensor_header
from .hub.push import is_prefix_plus_model, push_adapter
from .tuner.attention import register_attention_functions
from .tuner.config import PEFT_TYPE_NAME, PrefixPlusConfig
from .tuner.layer import KEY_MARKER, KEY_PREFIX
from .tuner.model import PrefixPlusModel

#: Set on every wrapper this module installs, so that installing twice wraps nothing twice.
HOOK_MARK = "_prefix_plus_hook"


def install() -> None:
    """Register ``PREFIX_PLUS`` with PEFT and make the changes listed in the module docstring (idempotent).

    Example:

    ```py
    >>> install()
    >>> PeftType.PREFIX_PLUS in PEFT_TYPE_TO_TUNER_MAPPING
    True
    ```
    """
    peft_type = add_peft_type_member(PEFT_TYPE_NAME)
    if peft_type not in PEFT_TYPE_TO_TUNER_MAPPING:
        register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=PrefixPlusConfig, model_cls=PrefixPlusModel)
    register_attention_functions()
    if not getattr(PeftModel.load_adapter, HOOK_MARK, False):
        _wrap_loading()
        _wrap_hub_methods()


def add_peft_type_member(name: str) -> PeftType:
    """Add ``name`` to the ``PeftType`` enum (a ``str`` enum) unless it is already there, and return the member.

    Args:
        name (`str`): The member name, e.g. ``"PREFIX_PLUS"``.

    Example:

    ```py
    >>> add_peft_type_member("PREFIX_PLUS") is PeftType.PREFIX_PLUS
    True
    ```
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._value_ = name
    member._name_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    type.__setattr__(PeftType, name, member)
    return member


def check_local_adapter(model_id: Any, subfolder: Any = None) -> None:
    """Validate a local PrefixPlus adapter before PEFT builds anything from it; do nothing for anything else.

    An adapter folder counts as PrefixPlus when its config says so, or, when the config cannot be read, when its
    safetensors file holds PrefixPlus tensors. Hub ids and other adapter types are left to PEFT.

    Args:
        model_id (`str` or `os.PathLike`): What was passed to ``from_pretrained`` or ``load_adapter``.
        subfolder (`str`, *optional*): The ``subfolder`` passed with it.

    Raises:
        AdapterFileError: Naming the problem (see `peft_prefix_plus.files.check_prefix_plus_adapter`).

    Example:

    ```py
    >>> check_local_adapter("outputs/adapter")  # raises if the saved adapter is corrupt or mismatched
    ```
    """
    if not isinstance(model_id, (str, os.PathLike)):
        return
    directory = Path(model_id, subfolder or "")
    if not (directory / SAFETENSORS_WEIGHTS_NAME).is_file():
        return
    try:
        is_prefix_plus = read_config_dict(directory)["peft_type"] == PEFT_TYPE_NAME
    except AdapterFileError:
        try:
            is_prefix_plus = any(key.startswith(KEY_PREFIX) for key in read_tensor_header(directory))
        except AdapterFileError:
            return  # neither file is readable as PrefixPlus's: PEFT's own loader reports it
    if is_prefix_plus:
        check_prefix_plus_adapter(directory)


def _wrap_loading() -> None:
    stock_from_pretrained = PeftModel.from_pretrained.__func__
    stock_load_adapter = PeftModel.load_adapter

    @functools.wraps(stock_from_pretrained)
    def from_pretrained(cls: type, model: Any, model_id: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("config") is None:
            check_local_adapter(model_id, kwargs.get("subfolder"))
        return stock_from_pretrained(cls, model, model_id, *args, **kwargs)

    @functools.wraps(stock_load_adapter)
    def load_adapter(self: PeftModel, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        if adapter_name not in self.peft_config:  # from_pretrained has created it from a checked folder otherwise
            check_local_adapter(model_id, kwargs.get("subfolder"))
        result = stock_load_adapter(self, model_id, adapter_name, *args, **kwargs)
        peft_type = getattr(getattr(self.peft_config.get(adapter_name), "peft_type", None), "value", None)
        foreign = [key for key in getattr(result, "unexpected_keys", ()) if KEY_MARKER in key]
        if foreign and peft_type != PEFT_TYPE_NAME:
            raise AdapterFileError(
                f"{model_id} holds PrefixPlus tensors (e.g. {foreign[0]!r}), but its adapter_config.json says "
                f"peft_type {peft_type!r}: loading it that way would give an adapter that changes nothing. "
                f'Restore "peft_type": "{PEFT_TYPE_NAME}" in adapter_config.json.'
            )
        return result

    from_pretrained.__dict__[HOOK_MARK] = True
    load_adapter.__dict__[HOOK_MARK] = True
    PeftModel.from_pretrained = classmethod(from_pretrained)
    PeftModel.load_adapter = load_adapter


def _wrap_hub_methods() -> None:
    stock_push_to_hub = PeftModel.push_to_hub
    stock_create_or_update_model_card = PeftModel.create_or_update_model_card

    @functools.wraps(stock_push_to_hub)
    def push_to_hub(self: PeftModel, repo_id: str, *args: Any, **kwargs: Any) -> Any:
        if not is_prefix_plus_model(self):
            return stock_push_to_hub(self, repo_id, *args, **kwargs)
        if args:
            raise PrefixPlusTypeError("push_to_hub() takes the repo id as its only positional argument.")
        kwargs.pop("max_shard_size", None)  # adapters are small: never sharded
        if kwargs.pop("safe_serialization", True) is False:
            raise PrefixPlusValueError(
                "PrefixPlus adapters are pushed as safetensors only; drop safe_serialization=False."
            )
        return push_adapter(self, repo_id, **kwargs)

    @functools.wraps(stock_create_or_update_model_card)
    def create_or_update_model_card(self: PeftModel, output_dir: str) -> None:
        if not is_prefix_plus_model(self):
            return stock_create_or_update_model_card(self, output_dir)
        foreign = self.base_model.foreign_adapter_modules()
        if foreign:  # save_pretrained calls this hook: warn there
            warnings.warn(
                f"{len(foreign)} module(s) of this PrefixPlus model carry another PEFT method's adapter layers (e.g. "
                f"{foreign[:3]}), put in by hand (`inject_adapter_in_model`); `save_pretrained` wrote only the "
                "PrefixPlus tensors, so those weights are not in the saved adapter. Save them separately, e.g. with "
                "`peft.get_peft_model_state_dict` and `safetensors.torch.save_file`.",
                UserWarning,
                stacklevel=3,
            )
        card.create_or_update_model_card(self, output_dir, peft_writer=stock_create_or_update_model_card)

    push_to_hub.__doc__ = (
        "Upload the adapter to the Hub. For PrefixPlus models this is `peft_prefix_plus.push_adapter` (adapter "
        "files and a PrefixPlus model card; also accepts `metrics=`); for other PEFT types, the stock method:\n\n"
        + (stock_push_to_hub.__doc__ or "")
    )
    push_to_hub.__dict__[HOOK_MARK] = True
    create_or_update_model_card.__dict__[HOOK_MARK] = True
    PeftModel.push_to_hub = push_to_hub
    PeftModel.create_or_update_model_card = create_or_update_model_card

"""A PrefixPlus adapter file loaded under another ``peft_type`` is refused, not loaded as an empty adapter.

A hand-edited ``adapter_config.json`` saying ``"peft_type": "LORA"`` over PrefixPlus tensors makes PEFT build a
LoRA adapter that none of the file's tensors fit; PEFT reports them only as unexpected keys, and the model then
computes as the base model. PEFT offers no hook for other methods' loading, so `install_load_guard` wraps
`PeftModel.load_adapter` (which `from_pretrained` calls) the way the Hub hooks wrap `push_to_hub`: for every adapter
type the stock method runs unchanged, and only its result is checked.
"""

from __future__ import annotations

import functools
from typing import Any

from peft import PeftModel

from .peft_type import PEFT_TYPE_NAME

#: Saved PrefixPlus tensors carry this in their key, whatever the adapter name.
PREFIX_PLUS_KEY = "prefix_plus_layer.prefix_plus_sites."


def install_load_guard() -> None:
    """Make `PeftModel.load_adapter` refuse PrefixPlus tensors loaded under another ``peft_type`` (idempotent).

    Example:

    ```py
    >>> install_load_guard()
    >>> PeftModel.from_pretrained(base, "adapter-whose-config-says-LORA")
    ValueError: ... holds PrefixPlus tensors, but its adapter_config.json says peft_type 'LORA' ...
    ```
    """
    if getattr(PeftModel.load_adapter, "_prefix_plus_hook", False):
        return
    stock_load_adapter = PeftModel.load_adapter

    @functools.wraps(stock_load_adapter)
    def load_adapter(self: PeftModel, model_id: Any, adapter_name: str, *args: Any, **kwargs: Any) -> Any:
        result = stock_load_adapter(self, model_id, adapter_name, *args, **kwargs)
        peft_type = getattr(getattr(self.peft_config.get(adapter_name), "peft_type", None), "value", None)
        foreign = [key for key in getattr(result, "unexpected_keys", ()) if PREFIX_PLUS_KEY in key]
        if foreign and peft_type != PEFT_TYPE_NAME:
            raise ValueError(
                f"{model_id} holds PrefixPlus tensors (e.g. {foreign[0]!r}), but its adapter_config.json says "
                f"peft_type {peft_type!r}: loading it that way would give an adapter that changes nothing. "
                f'Restore "peft_type": "{PEFT_TYPE_NAME}" in adapter_config.json.'
            )
        return result

    load_adapter._prefix_plus_hook = True
    PeftModel.load_adapter = load_adapter

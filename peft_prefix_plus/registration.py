"""Registration of ``PREFIX_PLUS`` as a PEFT method: the config and tuner classes PEFT looks up by type.

Idempotent: importing the package twice, or reloading it, registers the method once.
"""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import PrefixPlusConfig
from .model import PrefixPlusModel
from .peft_type import PEFT_TYPE_NAME, add_peft_type_member

__all__ = ["PEFT_TYPE_NAME", "register"]


def register() -> None:
    """Make ``PREFIX_PLUS`` known to PEFT: ``get_peft_model``, ``PeftModel.from_pretrained`` and ``AutoPeftModel*``.

    Called when ``peft_prefix_plus`` and ``peft`` are both imported; calling it again does nothing.

    Example:

    ```py
    >>> register()
    >>> PeftType.PREFIX_PLUS in PEFT_TYPE_TO_TUNER_MAPPING
    True
    ```
    """
    peft_type = add_peft_type_member(PEFT_TYPE_NAME)
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=PrefixPlusConfig, model_cls=PrefixPlusModel)

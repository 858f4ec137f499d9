"""Registration of ``PREFIX_PLUS`` as a PEFT method.

PEFT only accepts methods whose name is a member of :class:`peft.PeftType`. Python offers no public API to add a
member to an existing ``Enum``, so :func:`_add_peft_type_member` does by hand what ``EnumType`` does when it builds a
member. Everything here is idempotent: importing the package twice, or reloading it, registers the method once.
"""

from __future__ import annotations

from peft.utils import PeftType, register_peft_method

PEFT_TYPE_NAME = "PREFIX_PLUS"


def _add_peft_type_member(name: str) -> PeftType:
    """Add ``name`` to the ``PeftType`` enum (a ``str`` enum) unless it is already there, and return the member."""
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


def register() -> None:
    """Make ``PREFIX_PLUS`` known to PEFT: ``get_peft_model``, ``PeftModel.from_pretrained`` and ``AutoPeftModel*``.

    Called on ``import peft_prefix_plus``; calling it again does nothing.
    """
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    from .config import PrefixPlusConfig
    from .model import PrefixPlusModel

    peft_type = _add_peft_type_member(PEFT_TYPE_NAME)
    if peft_type in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name=PEFT_TYPE_NAME.lower(), config_cls=PrefixPlusConfig, model_cls=PrefixPlusModel)

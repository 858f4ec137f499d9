"""The ``PREFIX_PLUS`` member of PEFT's ``PeftType`` enum.

PEFT only accepts methods whose name is a member of :class:`peft.PeftType`. Python offers no public API to add a
member to an existing ``Enum``, so :func:`add_peft_type_member` does by hand what ``EnumType`` does when it builds a
member. It is idempotent, and this module imports nothing of the package, so the config can use it.
"""

from __future__ import annotations

from peft.utils import PeftType

PEFT_TYPE_NAME = "PREFIX_PLUS"


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

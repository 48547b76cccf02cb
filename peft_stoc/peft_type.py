"""The `PeftType` member of Stochastic Tuning, added to PEFT's enum the way `Enum` builds its own members."""

from __future__ import annotations

from peft.utils import PeftType

STOC_NAME = "stoc"


def _peft_type_member(name: str) -> PeftType:
    """Return `PeftType[name]`, adding the member first if this process has not done so yet.

    `PeftType` is a `str` Enum with no API for new members; the member is added the way `Enum` builds its own,
    so `PeftType(name)`, `PeftType[name]`, iteration and JSON dumps all behave as for built-in members.
    """
    if name in PeftType.__members__:
        return PeftType[name]
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


STOC_PEFT_TYPE = _peft_type_member(STOC_NAME.upper())

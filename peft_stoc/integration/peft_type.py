"""The `PeftType` member of Stochastic Tuning, added to PEFT's enum the way `Enum` builds its own members."""

from __future__ import annotations

from peft.utils import PeftType

from .. import compat

STOC_NAME = "stoc"


def _peft_type_member(name: str) -> PeftType:
    """Return `PeftType[name]`, adding the member first if this process has not done so yet (`PeftType` has no API
    for new members: `compat.add_peft_type` builds it the way `Enum` builds its own)."""
    if name in PeftType.__members__:
        return PeftType[name]
    return compat.add_peft_type(name)


STOC_PEFT_TYPE = _peft_type_member(STOC_NAME.upper())

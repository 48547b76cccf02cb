"""Make PEFT know Stochastic Tuning: a `PeftType` member plus `register_peft_method`, both idempotent.

PEFT has no plugin entry point, so the method exists only in processes that imported `peft_stoc`.
"""

from __future__ import annotations

import sys

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


def register() -> None:
    """Register `StocTuningConfig` and `StocTuningModel` with PEFT; calling it again does nothing."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import StocTuningConfig
    from .model import StocTuningModel

    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(STOC_PEFT_TYPE)
    if registered is not None:
        # A reload of peft_stoc creates new classes: point PEFT at them so configs and tuners stay consistent.
        PEFT_TYPE_TO_CONFIG_MAPPING[STOC_PEFT_TYPE] = StocTuningConfig
        PEFT_TYPE_TO_TUNER_MAPPING[STOC_PEFT_TYPE] = StocTuningModel
        return
    register_peft_method(name=STOC_NAME, config_cls=StocTuningConfig, model_cls=StocTuningModel, prefix="stoc_")


def register_trainer_callback() -> None:
    """Put `StocTuningCallback` among the callbacks every new transformers `Trainer` starts with (idempotent).

    Does nothing while `transformers.trainer` is not imported or still initialising: it runs again when that
    import finishes and whenever a StocTuning model is created, which is before any Trainer that trains one.
    """
    trainer = sys.modules.get("transformers.trainer")
    if trainer is None or getattr(trainer.__spec__, "_initializing", False):
        return
    defaults = getattr(trainer, "DEFAULT_CALLBACKS", None)
    if defaults is None:
        return
    from .callback import StocTuningCallback

    # Compare by name: a reload of peft_stoc creates a new class that should replace the old one.
    defaults[:] = [cb for cb in defaults if getattr(cb, "__name__", None) != StocTuningCallback.__name__]
    defaults.append(StocTuningCallback)

"""Make PEFT know Stochastic Tuning: `register_peft_method` with our config and tuner, idempotently.

PEFT has no plugin entry point, so the method exists only in processes that imported `peft_stoc`.
"""

from __future__ import annotations

from .config import StocTuningConfig
from .model import StocTuningModel
from .peft_type import STOC_NAME, STOC_PEFT_TYPE


def register() -> None:
    """Register `StocTuningConfig` and `StocTuningModel` with PEFT; calling it again does nothing."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(STOC_PEFT_TYPE)
    if registered is not None:
        # A reload of peft_stoc creates new classes: point PEFT at them so configs and tuners stay consistent.
        PEFT_TYPE_TO_CONFIG_MAPPING[STOC_PEFT_TYPE] = StocTuningConfig
        PEFT_TYPE_TO_TUNER_MAPPING[STOC_PEFT_TYPE] = StocTuningModel
        return
    register_peft_method(name=STOC_NAME, config_cls=StocTuningConfig, model_cls=StocTuningModel, prefix="stoc_")

"""Make PEFT know Stochastic Tuning: `register_peft_method` with our config and tuner, idempotently.

PEFT has no plugin entry point, so the method exists only in processes that imported `peft_stoc` (an installed
package imports it as soon as PEFT is imported: `_peft_stoc_autoload.py`). The first StocTuning config made in a
process also gives StocTuning PEFT models their own class (`peft_integration.install`) and puts
`StocTuningCallback` among transformers Trainer's default callbacks (`trainer_hooks`).
"""

from __future__ import annotations

from ..tuner import config
from ..tuner.config import StocTuningConfig
from ..tuner.model import StocTuningModel
from .peft_model import install as install_peft_model_classes
from .peft_type import STOC_NAME, STOC_PEFT_TYPE
from .trainer_hooks import register_trainer_callback


def register() -> None:
    """Register StocTuning with PEFT (its name, config and tuner); idempotent. Nothing else changes in the process
    until a StocTuning config is made (`activate`)."""
    register_method()
    config.on_made = activate


_active = False


def activate() -> None:
    """What StocTuning models need beyond PEFT's registry, installed when the first `StocTuningConfig` is made (every
    StocTuning model, created or loaded, has one): their PEFT model classes (a torch module-registration hook) and
    the Trainer callback. A process that only uses other methods never pays for either. Idempotent."""
    global _active
    if _active:
        return
    _active = True
    install_peft_model_classes()
    register_trainer_callback()
    try:
        from _peft_stoc_autoload import after_import
    except ImportError:  # a source tree that was not installed: model creation registers the callback
        pass
    else:
        after_import("transformers.trainer", register_trainer_callback)  # Trainer imported later


def register_method() -> None:
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

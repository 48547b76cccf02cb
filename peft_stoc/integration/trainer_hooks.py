"""Put `StocTuningCallback` among the callbacks every transformers `Trainer` starts with."""

from __future__ import annotations

import sys

from .. import compat


def register_trainer_callback() -> None:
    """Put `StocTuningCallback` among the callbacks every new transformers `Trainer` starts with (idempotent).

    Does nothing while `transformers.trainer` is not imported or still initialising: it runs again when that
    import finishes and whenever a StocTuning model is created, which is before any Trainer that trains one.
    """
    trainer = sys.modules.get("transformers.trainer")
    if trainer is None or compat.module_initializing(trainer):
        return
    defaults = getattr(trainer, "DEFAULT_CALLBACKS", None)
    if defaults is None:
        return
    from .callback import StocTuningCallback

    # Compare by name: a reload of peft_stoc creates a new class that should replace the old one.
    defaults[:] = [cb for cb in defaults if getattr(cb, "__name__", None) != StocTuningCallback.__name__]
    defaults.append(StocTuningCallback)

"""peft-stoc: Stochastic Tuning for HuggingFace PEFT.

Importing the package registers the method with PEFT (`registry.register`), so `StocTuningConfig` works wherever a
`LoraConfig` does; it does nothing else until a StocTuning config is made (`registry.activate`).
"""

from .integration.peft_type import STOC_PEFT_TYPE
from .integration.registry import register
from .training.step import StocTuningStep
from .tuner.config import StocTuningConfig
from .tuner.delta import SparseDelta
from .tuner.model import StocTuningModel


def __getattr__(name: str):
    # The Trainer callback imports transformers' trainer utilities, which may still be initialising while PEFT
    # (and with it this package) is imported; load it on first use.
    if name == "StocTuningCallback":
        from .integration.callback import StocTuningCallback

        return StocTuningCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register()

__version__ = "0.1.0"

__all__ = [
    "STOC_PEFT_TYPE",
    "SparseDelta",
    "StocTuningCallback",
    "StocTuningConfig",
    "StocTuningModel",
    "StocTuningStep",
    "__version__",
]

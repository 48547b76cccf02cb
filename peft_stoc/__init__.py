"""peft-stoc: Stochastic Tuning for HuggingFace PEFT.

Importing the package registers the method with PEFT, so `StocTuningConfig` works wherever a `LoraConfig` does.
"""

from .callback import StocTuningCallback, register_trainer_callback
from .config import StocTuningConfig
from .delta import SparseDelta
from .model import StocTuningModel
from .registry import STOC_PEFT_TYPE, register

register()
register_trainer_callback()

__version__ = "0.1.0"

__all__ = [
    "STOC_PEFT_TYPE",
    "SparseDelta",
    "StocTuningCallback",
    "StocTuningConfig",
    "StocTuningModel",
    "__version__",
]

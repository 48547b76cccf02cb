"""peft-stoc: Stochastic Tuning for HuggingFace PEFT.

Importing the package registers the method with PEFT, so `StocTuningConfig` works wherever a `LoraConfig` does.
"""

from .config import StocTuningConfig
from .delta import SparseDelta
from .model import StocTuningModel
from .registry import STOC_PEFT_TYPE, register

register()

__version__ = "0.1.0"

__all__ = ["STOC_PEFT_TYPE", "SparseDelta", "StocTuningConfig", "StocTuningModel", "__version__"]

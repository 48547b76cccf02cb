"""peft-stoc: Stochastic Tuning for HuggingFace PEFT.

Importing the package registers the method with PEFT, so `StocTuningConfig` works wherever a `LoraConfig` does.
"""

from .config import StocTuningConfig
from .delta import SparseDelta
from .model import StocTuningModel
from .peft_integration import install as _install_peft_integration
from .peft_type import STOC_PEFT_TYPE
from .registry import register
from .trainer_hooks import register_trainer_callback


def __getattr__(name: str):
    # The Trainer callback imports transformers' trainer utilities, which may still be initialising while PEFT
    # (and with it this package) is imported; load it on first use.
    if name == "StocTuningCallback":
        from .callback import StocTuningCallback

        return StocTuningCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


register()
_install_peft_integration()
register_trainer_callback()
try:
    from _peft_stoc_autoload import after_import
except ImportError:  # a source tree that was not installed: model creation registers the callback
    pass
else:
    after_import("transformers.trainer", register_trainer_callback)

__version__ = "0.1.0"

__all__ = [
    "STOC_PEFT_TYPE",
    "SparseDelta",
    "StocTuningCallback",
    "StocTuningConfig",
    "StocTuningModel",
    "__version__",
]

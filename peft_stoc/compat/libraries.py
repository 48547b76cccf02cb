"""The private names of accelerate, PEFT, transformers, bitsandbytes and Python that peft-stoc reaches (a part of
`peft_stoc.compat`)."""

from __future__ import annotations

import sys
from collections.abc import Mapping

import torch
from torch import nn

from .guards import declare

# -- accelerate ----------------------------------------------------------------------------------------------------
_ACCELERATE_STATES = ("AcceleratorState", "PartialState", "GradientState")


def _accelerate_shared_states_there() -> bool:
    import importlib

    state = importlib.import_module("accelerate.state")
    return all(isinstance(vars(getattr(state, name)).get("_shared_state"), dict) for name in _ACCELERATE_STATES)


_ACCELERATE_SHARED_STATE = declare(
    "accelerate_shared_state",
    "accelerate",
    "`_shared_state` of `AcceleratorState`, `PartialState` and `GradientState`",
    "read how accelerate (or Trainer) runs the model and whether a backward ends an optimizer step, without "
    "creating accelerate's state",
    _accelerate_shared_states_there,
)


def accelerate_shared_state(holder: str) -> dict | None:
    """The dict every instance of accelerate's state class `holder` ('AcceleratorState', 'PartialState' or
    'GradientState') shares; None while `accelerate.state` is not imported. Instantiating the class, its public
    way in, would create the state where none exists."""
    state = sys.modules.get("accelerate.state")
    if state is None:
        return None
    if holder not in _ACCELERATE_STATES:
        raise ValueError(f"{holder!r} is not one of accelerate's state classes {_ACCELERATE_STATES}.")
    if not _ACCELERATE_SHARED_STATE.passed:
        _ACCELERATE_SHARED_STATE.ensure()
    return getattr(state, holder)._shared_state


# -- PEFT ----------------------------------------------------------------------------------------------------------
def _get_submodules_there() -> bool:
    from peft import utils

    return callable(utils._get_submodules)


_GET_SUBMODULES = declare(
    "get_submodules",
    "peft",
    "`peft.utils._get_submodules`",
    "replace a module by name the way PEFT's own unloading does",
    _get_submodules_there,
)


def get_submodules(model: nn.Module, key: str) -> tuple[nn.Module, nn.Module, str]:
    """(parent, module, name in parent) of the module `key` of `model`, as PEFT finds them."""
    _GET_SUBMODULES.ensure()
    from peft.utils import _get_submodules

    return _get_submodules(model, key)


def _disable_flag_there() -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return isinstance(BaseTunerLayer._disable_adapters, bool) and isinstance(BaseTunerLayer.disable_adapters, property)


_ADAPTERS_DISABLED = declare(
    "set_adapters_disabled",
    "peft",
    "`BaseTunerLayer._disable_adapters`",
    "mark a layer's adapters disabled or enabled without touching `requires_grad`",
    _disable_flag_there,
)


def set_adapters_disabled(layer, disabled: bool) -> None:
    """Set the flag behind PEFT's `layer.disable_adapters`; `layer.enable_adapters()` would also change which
    parameters require gradients."""
    _ADAPTERS_DISABLED.ensure()
    layer._disable_adapters = disabled


def _peft_type_internals_there() -> bool:
    from peft.utils import PeftType

    tables = vars(PeftType)  # its own tables (`Enum` has empty ones of its own)
    return (
        isinstance(tables.get("_member_map_"), dict)
        and isinstance(tables.get("_value2member_map_"), dict)
        and isinstance(tables.get("_member_names_"), list)
    )


_PEFT_TYPE_MEMBER = declare(
    "add_peft_type",
    "python",
    "`Enum` internals (`_member_map_`, `_value2member_map_`, `_member_names_`, `_name_`, `_value_`) of PEFT's "
    "`PeftType`",
    "register Stochastic Tuning as a `PeftType`",
    _peft_type_internals_there,
)


def add_peft_type(name: str):
    """Add the member `name` (its value is its name) to PEFT's `PeftType` and return it. A `str` Enum has no API for
    new members: the member is built the way `Enum` builds its own, so `PeftType(name)`, `PeftType[name]`,
    iteration and JSON dumps all behave as for built-in members."""
    _PEFT_TYPE_MEMBER.ensure()
    from peft.utils import PeftType

    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    type.__setattr__(PeftType, name, member)
    return member


# -- transformers --------------------------------------------------------------------------------------------------
def _peft_flag_there() -> bool:
    from transformers.integrations.peft import PeftAdapterMixin

    return isinstance(PeftAdapterMixin._hf_peft_config_loaded, bool)


_HF_PEFT_CONFIG_LOADED = declare(
    "hf_peft_config_loaded",
    "transformers",
    "`PeftAdapterMixin._hf_peft_config_loaded`",
    "tell adapters loaded through transformers' PEFT integration, which leaves a StocTuning adapter's deltas out",
    _peft_flag_there,
)


def hf_peft_config_loaded(model: nn.Module) -> bool:
    """Whether transformers' PEFT integration (`model.load_adapter`, `from_pretrained(adapter_dir)`) loaded an
    adapter into `model`: transformers sets this flag and has no public test for it."""
    _HF_PEFT_CONFIG_LOADED.ensure()
    return getattr(model, "_hf_peft_config_loaded", False)


def _auto_mapping_there() -> bool:
    import transformers

    return isinstance(transformers.AutoModel._model_mapping._model_mapping, Mapping)


_AUTO_MODEL_NAMES = declare(
    "auto_model_names",
    "transformers",
    "`_model_mapping` of the auto classes (and of their lazy mapping)",
    "find which auto class builds a base model from its architecture name, without importing every model",
    _auto_mapping_there,
)


def auto_model_names(auto_class: str) -> Mapping:
    """model type -> the class name(s) the transformers auto class `auto_class` builds for it ({} for an auto class
    this transformers lacks). The public mapping imports each model class as it is read."""
    _AUTO_MODEL_NAMES.ensure()
    import transformers

    mapping = getattr(getattr(transformers, auto_class, None), "_model_mapping", None)
    return getattr(mapping, "_model_mapping", {}) or {}


# -- bitsandbytes --------------------------------------------------------------------------------------------------
def _bnb_unpack_there() -> bool:
    from bitsandbytes import functional

    return callable(functional._convert_weight_packed_for_cpu_inverse)


_BNB_CPU_UNPACK = declare(
    "bnb_unpack_cpu_weight",
    "bitsandbytes",
    "`bitsandbytes.functional._convert_weight_packed_for_cpu_inverse`",
    "put a 4-bit weight that bitsandbytes rewrote for CPU inference back in its portable layout",
    _bnb_unpack_there,
)


def bnb_unpack_cpu_weight(data: torch.Tensor, quant_state):
    """(data, quant_state) of a 4-bit weight in bitsandbytes' portable layout, from its CPU-only layout: what
    bitsandbytes' own `state_dict()` calls, with no public name."""
    _BNB_CPU_UNPACK.ensure()
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    return _convert_weight_packed_for_cpu_inverse(data, quant_state)


# -- Python --------------------------------------------------------------------------------------------------------
_CALLER_FRAME = declare(
    "caller_frame",
    "python",
    "`sys._getframe`",
    "find the caller's frame (warnings that point at the user's line; torch.distributed.checkpoint as a caller)",
    lambda: callable(sys._getframe),
)


def caller_frame(level: int = 0):
    """The frame `level` calls above the function calling this one: what `sys._getframe(level)` gives there
    (`inspect.stack()` builds every frame's source context, far too slow here)."""
    if not _CALLER_FRAME.passed:
        _CALLER_FRAME.ensure()
    return sys._getframe(level + 1)


_MODULE_INITIALIZING = declare(
    "module_initializing",
    "python",
    "`ModuleSpec._initializing`",
    "wait until `transformers.trainer` has finished importing before changing its defaults",
    lambda: hasattr(sys.modules[__name__].__spec__, "_initializing"),
)


def module_initializing(module) -> bool:
    """Whether `module` is still running its import (Python's import system marks its spec meanwhile)."""
    _MODULE_INITIALIZING.ensure()
    return getattr(module.__spec__, "_initializing", False)

"""Every private name of torch, accelerate, PEFT, transformers, bitsandbytes and Python that peft-stoc uses.

Each accessor below reaches one such name where no public API does what StocTuning needs. Each has a `Guard`: the
condition that the name is there as the code expects, checked when the accessor is first used (afterwards the
check is one attribute read). A failed check raises `IncompatibleLibrary`, which names the library, its installed
version, the private name, what peft-stoc needs it for and the versions it was written against, instead of an
`AttributeError` deep inside a training step. `GUARDS` lists every guard.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import nn

# The versions peft-stoc was written against (pyproject.toml's requirements).
SUPPORTED = {
    "python": ">=3.10",
    "torch": ">=2.5,<3",
    "accelerate": ">=1.0",
    "peft": ">=0.21,<0.22",
    "transformers": ">=4.56",
    "bitsandbytes": ">=0.50,<0.51",
}


def installed_version(library: str) -> str:
    """The installed version of `library` ('python' for the interpreter)."""
    if library == "python":
        return platform.python_version()
    from importlib import metadata

    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return "(not installed)"


class IncompatibleLibrary(RuntimeError):
    """A private name peft-stoc relies on is missing, or not as expected, in the installed version of a library."""

    def __init__(self, guard: Guard):
        self.guard = guard
        library, supported = guard.library, SUPPORTED[guard.library]
        advice = (
            f"use Python {supported}"
            if library == "python"
            else f"install a version in that range (pip install '{library}{supported}')"
        )
        super().__init__(
            f"peft-stoc needs {guard.private} from {library} to {guard.purpose}, and {library} "
            f"{installed_version(library)} does not have it as expected. peft-stoc supports {library} {supported}: "
            f"{advice}."
        )


class Guard:
    """One private name of another library: what it is, what peft-stoc needs it for, and the condition that it is
    there as expected (a callable, true when it is). `ensure` checks the condition once, then only reads `passed`."""

    def __init__(self, library: str, private: str, purpose: str, condition: Callable[[], object], accessors):
        self.library = library
        self.private = private
        self.purpose = purpose
        self.condition = condition
        self.accessors = tuple(accessors)
        self.passed = False

    def check(self) -> bool:
        """Whether the condition holds (any error while checking it counts as not)."""
        return self._failure() is None

    def ensure(self) -> None:
        """Raise `IncompatibleLibrary` unless the condition holds; checked once."""
        if self.passed:
            return
        failure = self._failure()
        if failure is not None:
            # chained to the error the check met, if any, for whoever debugs a new version of the library
            raise IncompatibleLibrary(self) from (failure if isinstance(failure, Exception) else None)
        self.passed = True

    def _failure(self) -> Exception | bool | None:
        """None when the condition holds; else the error checking it raised, or False."""
        try:
            return None if self.condition() else False
        except Exception as error:
            return error

    def __repr__(self) -> str:
        return f"Guard({self.library}: {self.private})"


GUARDS: dict[str, Guard] = {}  # name -> guard; each guard lists the accessors it covers


def _guard(name: str, library: str, private: str, purpose: str, condition, *accessors: str) -> Guard:
    guard = GUARDS[name] = Guard(library, private, purpose, condition, accessors or (name,))
    return guard


def _first_module(*names: str):
    """The first of `names` that imports (a private module moved between versions)."""
    import importlib

    for name in names[:-1]:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return importlib.import_module(names[-1])


def _sets_in_init(cls, attribute: str) -> bool:
    """Whether `cls` has `attribute`, or its `__init__` assigns it (an instance attribute)."""
    return hasattr(cls, attribute) or attribute in cls.__init__.__code__.co_names


# -- torch: tensors and ops ----------------------------------------------------------------------------------------
_TENSOR_VERSION = _guard(
    "tensor_version",
    "torch",
    "`Tensor._version` (a tensor's version counter)",
    "tell whether a gradient was changed in place since the backward that completed it",
    lambda: hasattr(torch.Tensor, "_version"),
)


def tensor_version(tensor: torch.Tensor) -> int:
    """`tensor._version`: bumped by every in-place change of the tensor (no public API reads it). Read per parameter
    per step, so the guard costs one attribute read after the first call."""
    if not _TENSOR_VERSION.passed:
        _TENSOR_VERSION.ensure()
    return tensor._version


_FOREACH_NORM = _guard(
    "foreach_norm",
    "torch",
    "`torch._foreach_norm`",
    "compute the norms of many gradients in one kernel, as `clip_grad_norm_` does",
    lambda: callable(torch._foreach_norm),
)


def foreach_norm(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """The 2-norm of each tensor, in one fused kernel (`torch.linalg.vector_norm` takes one tensor at a time)."""
    if not _FOREACH_NORM.passed:
        _FOREACH_NORM.ensure()
    return torch._foreach_norm(tensors)


class ForeachGradOps(NamedTuple):
    """The aten ops `clip_grad_norm_`, `zero_grad` and `GradScaler.unscale_` apply to a list of gradients."""

    mul_scalar: object
    mul_tensor: object
    non_finite_check_and_unscale: object
    zero: object


def _foreach_grad_ops() -> ForeachGradOps:
    aten = torch.ops.aten
    return ForeachGradOps(
        aten._foreach_mul_.Scalar,
        aten._foreach_mul_.Tensor,
        aten._amp_foreach_non_finite_check_and_unscale_.default,
        aten._foreach_zero_.default,
    )


_FOREACH_GRAD_OPS = _guard(
    "foreach_grad_ops",
    "torch",
    "the aten ops `_foreach_mul_`, `_foreach_zero_` and `_amp_foreach_non_finite_check_and_unscale_`",
    "let a consumed gradient answer gradient clipping, `zero_grad` and loss scaling",
    _foreach_grad_ops,
)


def foreach_grad_ops() -> ForeachGradOps:
    """The private aten ops torch's clipping, zeroing and loss scaling dispatch a list of gradients to: a tensor
    subclass standing for a gradient must handle them (they are what reaches `__torch_dispatch__`)."""
    _FOREACH_GRAD_OPS.ensure()
    return _foreach_grad_ops()


_WRAPPER_SUBCLASS = _guard(
    "make_wrapper_subclass",
    "torch",
    "`Tensor._make_wrapper_subclass`",
    "make a gradient placeholder that holds no data (memory='lean')",
    lambda: callable(torch.Tensor._make_wrapper_subclass),
)


def make_wrapper_subclass(cls: type, shape, **kwargs) -> torch.Tensor:
    """An instance of the tensor subclass `cls` with `shape` and no storage: the documented way to build a
    `__torch_dispatch__` subclass, which no public constructor offers."""
    _WRAPPER_SUBCLASS.ensure()
    return torch.Tensor._make_wrapper_subclass(cls, shape, **kwargs)


# -- torch: modules and their hooks --------------------------------------------------------------------------------
_MODULE_PARAMETERS = _guard(
    "module_parameters",
    "torch",
    "`Module._parameters` (a module's own parameter registry)",
    "find, and briefly swap, the parameter a module holds under a name",
    lambda: isinstance(vars(torch.nn.Module()).get("_parameters"), dict),
)


def module_parameters(module: nn.Module) -> dict:
    """`module._parameters`, the dict a module reads its own parameters from: read without `__getattr__` (FSDP2 swaps
    what it holds) and written with plain tensors for one forward, which `register_parameter` refuses."""
    if not _MODULE_PARAMETERS.passed:
        _MODULE_PARAMETERS.ensure()
    return module._parameters


_MODULE_CHILDREN = _guard(
    "module_children",
    "torch",
    "`Module._modules` (a module's registry of children)",
    "record and restore a model's module tree, and find or remove the adapters' state module",
    lambda: isinstance(vars(torch.nn.Module()).get("_modules"), dict),
)


def module_children(module: nn.Module) -> dict:
    """`module._modules`, the dict of a module's children by name, None entries included (`named_children` skips
    them and `__getattr__` looks elsewhere first)."""
    _MODULE_CHILDREN.ensure()
    return module._modules


# The hook tables of a module and of a tensor that attaching an adapter may add to.
_MODULE_HOOK_TABLES = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_state_dict_hooks",
    "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_TENSOR_HOOK_TABLES = ("_backward_hooks", "_post_accumulate_grad_hooks")

_MODULE_HOOKS = _guard(
    "module_hook_tables",
    "torch",
    "the hook tables of `Module` (`_forward_hooks`, `_state_dict_hooks`, ...)",
    "restore a model's hooks when attaching an adapter fails",
    lambda: all(isinstance(vars(torch.nn.Module()).get(name), dict) for name in _MODULE_HOOK_TABLES),
)


def module_hook_tables(module: nn.Module) -> dict[str, dict | None]:
    """Every hook table of `module` by name (None where it has none): torch lists or removes hooks only by the
    handle that added them, which code that added them elsewhere keeps."""
    _MODULE_HOOKS.ensure()
    return {name: getattr(module, name, None) for name in _MODULE_HOOK_TABLES}


_TENSOR_HOOKS = _guard(
    "tensor_hook_tables",
    "torch",
    "`Tensor._backward_hooks` and `Tensor._post_accumulate_grad_hooks`",
    "restore a parameter's hooks when attaching an adapter fails",
    lambda: all(hasattr(torch.Tensor, name) for name in _TENSOR_HOOK_TABLES),
)


def tensor_hook_tables(tensor: torch.Tensor) -> dict[str, dict | None]:
    """Every hook table of `tensor` by name (None until a hook is registered), as `module_hook_tables`."""
    _TENSOR_HOOKS.ensure()
    return {name: getattr(tensor, name, None) for name in _TENSOR_HOOK_TABLES}


# -- torch.distributed: FSDP1, FSDP2, DTensor, ZeroRedundancyOptimizer ---------------------------------------------
_FSDP1_MARK = "_fsdp_flattened"


def _fsdp1_mark_unchanged() -> bool:
    if not torch.distributed.is_available():  # no FSDP1 to mark anything
        return True
    from torch.distributed.fsdp import _common_utils

    return _common_utils.FSDP_FLATTENED == _FSDP1_MARK


_FSDP1_FLATTENED = _guard(
    "fsdp1_flattened",
    "torch",
    "FSDP1's parameter mark `_fsdp_flattened`",
    "recognise parameters that FSDP1 flattened (StocTuning cannot train them)",
    _fsdp1_mark_unchanged,
)


def fsdp1_flattened(param: torch.Tensor) -> bool:
    """Whether FullyShardedDataParallel (FSDP1) flattened `param` into one of its flat parameters: it marks them
    with an attribute, and has no public test for it."""
    _FSDP1_FLATTENED.ensure()
    return getattr(param, _FSDP1_MARK, False)


def _fsdp2_modules():
    return (
        _first_module(
            "torch.distributed.fsdp._fully_shard._fsdp_state", "torch.distributed._composable.fsdp._fsdp_state"
        ),
        _first_module(
            "torch.distributed.fsdp._fully_shard._fsdp_param", "torch.distributed._composable.fsdp._fsdp_param"
        ),
    )


def _fsdp2_states_there() -> bool:
    from torch.distributed._composable_state import _module_state_mapping

    state_module, _ = _fsdp2_modules()
    return isinstance(_module_state_mapping, Mapping) and _sets_in_init(state_module.FSDPState, "_fsdp_param_group")


_FSDP2_STATES = _guard(
    "fsdp2_managed",
    "torch",
    "`torch.distributed._composable_state._module_state_mapping` and `FSDPState._fsdp_param_group`",
    "find the parameters FSDP2 (`fully_shard`) shards, and the modules holding them",
    _fsdp2_states_there,
)


def fsdp2_managed() -> list[tuple[nn.Module, list]]:
    """(module, FSDP2's `FSDPParam`s of its parameters) for every module `fully_shard` sharded in this process.
    FSDP2 keeps these in its per-module state only; each `FSDPParam` has the shard as `sharded_param`."""
    if not torch.distributed.is_available():  # torch built without distributed support: no FSDP2
        return []
    _FSDP2_STATES.ensure()
    from torch.distributed._composable_state import _module_state_mapping

    found = []
    for module, ref in list(_module_state_mapping.items()):
        state = ref() if callable(ref) else ref
        group = getattr(state, "_fsdp_param_group", None)  # None: another composable API's state, or no parameters
        if group is not None:
            found.append((module, group.fsdp_params))
    return found


def _fsdp2_param_homes_there() -> bool:
    import dataclasses

    _, param_module = _fsdp2_modules()
    fields = {f.name for f in dataclasses.fields(param_module.ParamModuleInfo)}
    return _sets_in_init(param_module.FSDPParam, "_module_info") and fields >= {
        "module",
        "param_name",
        "shared_modules",
        "shared_param_names",
    }


_FSDP2_PARAM_HOMES = _guard(
    "fsdp2_param_homes",
    "torch",
    "`FSDPParam._module_info`",
    "find the module (and name) under which FSDP2 registers each shard",
    _fsdp2_param_homes_there,
)


def fsdp2_param_homes(fsdp_param) -> list[tuple[nn.Module, str]]:
    """(module, parameter name) of every place FSDP2 registers the parameter of `fsdp_param`, shared ones last."""
    _FSDP2_PARAM_HOMES.ensure()
    info = fsdp_param._module_info
    return [(info.module, info.param_name), *zip(info.shared_modules, info.shared_param_names)]


_DTENSOR_LOCAL_SHAPE = _guard(
    "dtensor_local_shape_and_offset",
    "torch",
    "`torch.distributed.tensor._utils.compute_local_shape_and_global_offset`",
    "find the rows of a tensor this process holds under FSDP2",
    lambda: callable(_first_module("torch.distributed.tensor._utils").compute_local_shape_and_global_offset),
)


def dtensor_local_shape_and_offset(shape, mesh, placements) -> tuple[tuple, tuple]:
    """The shape of this rank's part of a DTensor of `shape` and its offset in the whole tensor (DTensor's public
    API gives the local tensor, not where it sits)."""
    _DTENSOR_LOCAL_SHAPE.ensure()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(shape, mesh, placements)


def _zero_sets_constructor() -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return _sets_in_init(ZeroRedundancyOptimizer, "_optim_constructor")


_ZERO_OPTIMIZER_CLASS = _guard(
    "zero_optimizer_class",
    "torch",
    "`ZeroRedundancyOptimizer._optim_constructor`",
    "learn which optimizer a ZeroRedundancyOptimizer shards",
    _zero_sets_constructor,
)


def zero_optimizer_class(optimizer) -> type | None:
    """The optimizer class a `ZeroRedundancyOptimizer` was built with (it keeps it privately only)."""
    _ZERO_OPTIMIZER_CLASS.ensure()
    return getattr(optimizer, "_optim_constructor", None)


# -- accelerate ----------------------------------------------------------------------------------------------------
_ACCELERATE_STATES = ("AcceleratorState", "PartialState", "GradientState")


def _accelerate_shared_states_there() -> bool:
    import importlib

    state = importlib.import_module("accelerate.state")
    return all(isinstance(vars(getattr(state, name)).get("_shared_state"), dict) for name in _ACCELERATE_STATES)


_ACCELERATE_SHARED_STATE = _guard(
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


_GET_SUBMODULES = _guard(
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


_ADAPTERS_DISABLED = _guard(
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


_PEFT_TYPE_MEMBER = _guard(
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


_HF_PEFT_CONFIG_LOADED = _guard(
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


_AUTO_MODEL_NAMES = _guard(
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


_BNB_CPU_UNPACK = _guard(
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
_CALLER_FRAME = _guard(
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


_MODULE_INITIALIZING = _guard(
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

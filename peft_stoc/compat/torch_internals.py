"""The private names of torch that peft-stoc reaches (a part of `peft_stoc.compat`): tensors and ops, modules and
their hooks, FSDP1, FSDP2, DTensor and ZeroRedundancyOptimizer."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import nn

from .guards import declare, first_module, sets_in_init

# -- torch: tensors and ops ----------------------------------------------------------------------------------------
_TENSOR_VERSION = declare(
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


_FOREACH_NORM = declare(
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


_FUNCTION_MODE = declare(
    "function_mode_enabled",
    "torch",
    "`torch._C._is_torch_function_mode_enabled`",
    "read the weights on other threads only while no torch function mode (which holds for one thread) is active",
    lambda: callable(torch._C._is_torch_function_mode_enabled),
)


def function_mode_enabled() -> bool:
    """Whether a torch function mode is active on this thread (modes are per thread: work handed to another thread
    would run outside it)."""
    if not _FUNCTION_MODE.passed:
        _FUNCTION_MODE.ensure()
    return torch._C._is_torch_function_mode_enabled()


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


_FOREACH_GRAD_OPS = declare(
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


_WRAPPER_SUBCLASS = declare(
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
_MODULE_PARAMETERS = declare(
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


_MODULE_CHILDREN = declare(
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

_MODULE_HOOKS = declare(
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


_TENSOR_HOOKS = declare(
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


_FSDP1_FLATTENED = declare(
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
        first_module(
            "torch.distributed.fsdp._fully_shard._fsdp_state", "torch.distributed._composable.fsdp._fsdp_state"
        ),
        first_module(
            "torch.distributed.fsdp._fully_shard._fsdp_param", "torch.distributed._composable.fsdp._fsdp_param"
        ),
    )


def _fsdp2_states_there() -> bool:
    from torch.distributed._composable_state import _module_state_mapping

    state_module, _ = _fsdp2_modules()
    return isinstance(_module_state_mapping, Mapping) and sets_in_init(state_module.FSDPState, "_fsdp_param_group")


_FSDP2_STATES = declare(
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
    return sets_in_init(param_module.FSDPParam, "_module_info") and fields >= {
        "module",
        "param_name",
        "shared_modules",
        "shared_param_names",
    }


_FSDP2_PARAM_HOMES = declare(
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


_DTENSOR_LOCAL_SHAPE = declare(
    "dtensor_local_shape_and_offset",
    "torch",
    "`torch.distributed.tensor._utils.compute_local_shape_and_global_offset`",
    "find the rows of a tensor this process holds under FSDP2",
    lambda: callable(first_module("torch.distributed.tensor._utils").compute_local_shape_and_global_offset),
)


def dtensor_local_shape_and_offset(shape, mesh, placements) -> tuple[tuple, tuple]:
    """The shape of this rank's part of a DTensor of `shape` and its offset in the whole tensor (DTensor's public
    API gives the local tensor, not where it sits)."""
    _DTENSOR_LOCAL_SHAPE.ensure()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    return compute_local_shape_and_global_offset(shape, mesh, placements)


def _zero_sets_constructor() -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return sets_in_init(ZeroRedundancyOptimizer, "_optim_constructor")


_ZERO_OPTIMIZER_CLASS = declare(
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

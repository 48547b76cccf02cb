"""`peft_stoc.compat`: every guard passes on the installed libraries and its accessor reaches the real private name;
with that name gone, the accessor raises `IncompatibleLibrary` with what to do, not an AttributeError."""

import inspect
import json
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from importlib.machinery import ModuleSpec

import pytest
import torch

from peft_stoc import compat
from peft_stoc.compat import GUARDS, IncompatibleLibrary, libraries, torch_internals

ACCESSOR_MODULES = (torch_internals, libraries)  # where the accessors are defined (compat re-exports them)


class _Without:
    """`obj` as seen without the attribute at the dotted `path` below it (for names a test cannot delete, such as
    the C attributes of `torch.Tensor`)."""

    def __init__(self, obj, path: str):
        self.obj, self.path = obj, path.split(".")

    def __getattr__(self, name):
        if name != self.path[0]:
            return getattr(self.obj, name)
        if len(self.path) == 1:
            raise AttributeError(name)
        return _Without(getattr(self.obj, name), ".".join(self.path[1:]))


def _compat_sees(name: str, path: str):
    """Remove `path` from the module `name` as compat's accessors see it (their module's global `name`)."""

    def remove(monkeypatch):
        for module in ACCESSOR_MODULES:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, _Without(getattr(module, name), path))

    return remove


def _deleted(module: str, path: str):
    """Delete the attribute at the dotted `path` below the module `module` for the test."""

    def remove(monkeypatch):
        *owners, name = path.split(".")
        owner = pytest.importorskip(module)
        for attribute in owners:
            owner = getattr(owner, attribute)
        monkeypatch.delattr(owner, name)

    return remove


def _module_init_without(name: str):
    """New modules without the instance attribute `name` (as if `nn.Module.__init__` no longer set it)."""

    def remove(monkeypatch):
        init = torch.nn.Module.__init__

        def without(self, *args, **kwargs):
            init(self, *args, **kwargs)
            vars(self).pop(name)

        monkeypatch.setattr(torch.nn.Module, "__init__", without)

    return remove


def _init_replaced(owner: Callable[[], type]):
    """`owner().__init__` replaced by one that sets no attribute."""

    def remove(monkeypatch):
        monkeypatch.setattr(owner(), "__init__", lambda self, *args, **kwargs: None)

    return remove


def _fsdp_state_without_param_group(monkeypatch):
    state_class = torch_internals._fsdp2_modules()[0].FSDPState
    if "_fsdp_param_group" in vars(state_class):  # a property since torch 2.13, set in `__init__` before
        monkeypatch.delattr(state_class, "_fsdp_param_group")
    _init_replaced(lambda: state_class)(monkeypatch)


def _fsdp_param_module():
    return torch_internals._fsdp2_modules()[1]


# -- what each accessor returns on the installed libraries --------------------------------------------------------
_LINEAR = torch.nn.Linear(2, 3)


def _real_tensor_version(monkeypatch):
    tensor = torch.zeros(3)
    before = compat.tensor_version(tensor)
    tensor.add_(1)
    assert before == 0 and compat.tensor_version(tensor) == tensor._version == 1


def _real_foreach_norm(monkeypatch):
    tensors = [torch.tensor([3.0, 4.0]), torch.tensor([1.0])]
    assert [float(n) for n in compat.foreach_norm(tensors)] == [5.0, 1.0]


def _real_function_mode_enabled(monkeypatch):
    from torch.overrides import TorchFunctionMode

    assert compat.function_mode_enabled() is False
    with TorchFunctionMode():
        assert compat.function_mode_enabled() is True


def _real_foreach_grad_ops(monkeypatch):
    aten = torch.ops.aten
    assert tuple(compat.foreach_grad_ops()) == (
        aten._foreach_mul_.Scalar,
        aten._foreach_mul_.Tensor,
        aten._amp_foreach_non_finite_check_and_unscale_.default,
        aten._foreach_zero_.default,
    )


def _real_make_wrapper_subclass(monkeypatch):
    class Empty(torch.Tensor):
        @classmethod
        def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
            raise NotImplementedError

    made = compat.make_wrapper_subclass(Empty, (2, 3), dtype=torch.float16, device="cpu")
    assert type(made) is Empty and made.shape == (2, 3) and made.dtype == torch.float16


def _real_module_parameters(monkeypatch):
    assert compat.module_parameters(_LINEAR) is _LINEAR._parameters
    assert compat.module_parameters(_LINEAR)["weight"] is _LINEAR.weight


def _real_module_children(monkeypatch):
    model = torch.nn.Sequential(_LINEAR)
    assert compat.module_children(model) is model._modules and compat.module_children(model)["0"] is _LINEAR


def _real_module_hook_tables(monkeypatch):
    module = torch.nn.Linear(2, 2)
    module.register_forward_hook(lambda *args: None)
    tables = compat.module_hook_tables(module)
    assert tables["_forward_hooks"] is module._forward_hooks and len(tables["_forward_hooks"]) == 1
    assert all(table is getattr(module, name) for name, table in tables.items())


def _real_tensor_hook_tables(monkeypatch):
    param = torch.nn.Parameter(torch.zeros(2))
    assert compat.tensor_hook_tables(param) == {"_backward_hooks": None, "_post_accumulate_grad_hooks": None}
    param.register_post_accumulate_grad_hook(lambda p: None)
    tables = compat.tensor_hook_tables(param)
    assert tables["_post_accumulate_grad_hooks"] is param._post_accumulate_grad_hooks is not None


def _real_fsdp1_flattened(monkeypatch):
    from torch.distributed.fsdp._common_utils import _set_fsdp_flattened

    param = torch.nn.Parameter(torch.zeros(2))
    assert compat.fsdp1_flattened(param) is False
    _set_fsdp_flattened(param)
    assert compat.fsdp1_flattened(param) is True


def _real_fsdp2_managed(monkeypatch):
    from torch.distributed import _composable_state

    sharded, other = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    params = [types.SimpleNamespace(sharded_param=sharded.weight)]
    state = types.SimpleNamespace(_fsdp_param_group=types.SimpleNamespace(fsdp_params=params))
    plain = types.SimpleNamespace()  # another composable API's state
    monkeypatch.setitem(_composable_state._module_state_mapping, sharded, lambda: state)
    monkeypatch.setitem(_composable_state._module_state_mapping, other, lambda: plain)
    found = [(module, fsdp_params) for module, fsdp_params in compat.fsdp2_managed() if module in (sharded, other)]
    assert found == [(sharded, params)]


def _real_fsdp2_param_homes(monkeypatch):
    info = _fsdp_param_module().ParamModuleInfo(_LINEAR, "weight", [torch.nn.Linear(2, 3)], ["tied"])
    fsdp_param = types.SimpleNamespace(_module_info=info)
    assert compat.fsdp2_param_homes(fsdp_param) == [(_LINEAR, "weight"), (info.shared_modules[0], "tied")]


def _real_dtensor_local_shape_and_offset(monkeypatch):
    from torch.distributed.tensor import _utils

    calls = []
    monkeypatch.setattr(
        _utils, "compute_local_shape_and_global_offset", lambda *args: calls.append(args) or ((2, 3), (4, 0))
    )
    assert compat.dtensor_local_shape_and_offset((8, 3), "mesh", "placements") == ((2, 3), (4, 0))
    assert calls == [((8, 3), "mesh", "placements")]


def _real_zero_optimizer_class(monkeypatch):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    optimizer = object.__new__(ZeroRedundancyOptimizer)
    optimizer._optim_constructor = torch.optim.AdamW
    assert compat.zero_optimizer_class(optimizer) is torch.optim.AdamW


def _real_accelerate_shared_state(monkeypatch):
    state = pytest.importorskip("accelerate.state")
    for holder in ("AcceleratorState", "PartialState", "GradientState"):
        assert compat.accelerate_shared_state(holder) is getattr(state, holder)._shared_state
    with pytest.raises(ValueError, match="not one of accelerate's state classes"):
        compat.accelerate_shared_state("Accelerator")
    monkeypatch.delitem(sys.modules, "accelerate.state")
    assert compat.accelerate_shared_state("GradientState") is None  # accelerate not imported: nothing to read


def _real_get_submodules(monkeypatch):
    from peft.utils import _get_submodules

    model = torch.nn.Sequential(torch.nn.Sequential(_LINEAR))
    assert compat.get_submodules(model, "0.0") == _get_submodules(model, "0.0") == (model[0], _LINEAR, "0")


def _real_set_adapters_disabled(monkeypatch):
    from peft.tuners.tuners_utils import BaseTunerLayer

    layer = BaseTunerLayer()
    compat.set_adapters_disabled(layer, True)
    assert layer.disable_adapters is True
    compat.set_adapters_disabled(layer, False)
    assert layer.disable_adapters is False


def _real_add_peft_type(monkeypatch):
    from peft.utils import PeftType

    from peft_stoc import STOC_PEFT_TYPE

    assert PeftType("STOC") is PeftType["STOC"] is PeftType.STOC is STOC_PEFT_TYPE and STOC_PEFT_TYPE in list(PeftType)
    # A new member, on copies of the enum's tables that the test puts back afterwards.
    monkeypatch.setattr(PeftType, "COMPAT_PROBE", None, raising=False)
    for table in ("_member_map_", "_value2member_map_", "_member_names_"):
        monkeypatch.setattr(PeftType, table, type(getattr(PeftType, table))(getattr(PeftType, table)))
    member = compat.add_peft_type("COMPAT_PROBE")
    assert PeftType("COMPAT_PROBE") is PeftType["COMPAT_PROBE"] is PeftType.COMPAT_PROBE is member
    assert member == "COMPAT_PROBE" and member.name == member.value == "COMPAT_PROBE" and member in list(PeftType)
    assert json.dumps({"peft_type": member}) == '{"peft_type": "COMPAT_PROBE"}'


def _real_hf_peft_config_loaded(monkeypatch):
    from tests.helpers import tiny_model

    model = tiny_model()
    assert compat.hf_peft_config_loaded(model) is False
    model._hf_peft_config_loaded = True
    assert compat.hf_peft_config_loaded(model) is True


def _real_auto_model_names(monkeypatch):
    import transformers

    names = compat.auto_model_names("AutoModelForSequenceClassification")
    assert names is transformers.AutoModelForSequenceClassification._model_mapping._model_mapping
    assert names["bert"] == "BertForSequenceClassification"
    assert compat.auto_model_names("AutoModelForNothing") == {}


def _real_bnb_unpack_cpu_weight(monkeypatch):
    functional = pytest.importorskip("bitsandbytes.functional")
    calls = []
    monkeypatch.setattr(
        functional, "_convert_weight_packed_for_cpu_inverse", lambda *args: calls.append(args) or ("data", "state")
    )
    assert compat.bnb_unpack_cpu_weight("packed", "packed state") == ("data", "state")
    assert calls == [("packed", "packed state")]


def _real_caller_frame(monkeypatch):
    here = inspect.currentframe()

    def inner():
        return compat.caller_frame(), compat.caller_frame(1)

    own, caller = inner()
    assert own.f_code is inner.__code__ and caller is here


def _real_module_initializing(monkeypatch):
    assert compat.module_initializing(json) is False
    loading = types.ModuleType("loading")
    loading.__spec__ = ModuleSpec("loading", None)
    loading.__spec__._initializing = True
    assert compat.module_initializing(loading) is True


@dataclass
class Case:
    real: Callable  # (monkeypatch) -> None: asserts the accessor reaches the real thing
    call: Callable  # () -> the accessor's answer
    removals: tuple  # (monkeypatch) -> None, each taking the private name away


def _zero_optimizer():
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return object.__new__(ZeroRedundancyOptimizer)


CASES = {
    "tensor_version": Case(
        _real_tensor_version, lambda: compat.tensor_version(torch.zeros(1)), (_compat_sees("torch", "Tensor._version"),)
    ),
    "function_mode_enabled": Case(
        _real_function_mode_enabled,
        compat.function_mode_enabled,
        (_compat_sees("torch", "_C._is_torch_function_mode_enabled"),),
    ),
    "foreach_norm": Case(
        _real_foreach_norm,
        lambda: compat.foreach_norm([torch.zeros(1)]),
        (_compat_sees("torch", "_foreach_norm"),),
    ),
    "foreach_grad_ops": Case(
        _real_foreach_grad_ops,
        compat.foreach_grad_ops,
        (
            _compat_sees("torch", "ops.aten._foreach_mul_"),
            _compat_sees("torch", "ops.aten._foreach_zero_"),
            _compat_sees("torch", "ops.aten._amp_foreach_non_finite_check_and_unscale_"),
        ),
    ),
    "make_wrapper_subclass": Case(
        _real_make_wrapper_subclass,
        lambda: compat.make_wrapper_subclass(torch.Tensor, (1,)),
        (_compat_sees("torch", "Tensor._make_wrapper_subclass"),),
    ),
    "module_parameters": Case(
        _real_module_parameters, lambda: compat.module_parameters(_LINEAR), (_module_init_without("_parameters"),)
    ),
    "module_children": Case(
        _real_module_children, lambda: compat.module_children(_LINEAR), (_module_init_without("_modules"),)
    ),
    "module_hook_tables": Case(
        _real_module_hook_tables,
        lambda: compat.module_hook_tables(_LINEAR),
        (_module_init_without("_forward_hooks"), _module_init_without("_load_state_dict_post_hooks")),
    ),
    "tensor_hook_tables": Case(
        _real_tensor_hook_tables,
        lambda: compat.tensor_hook_tables(_LINEAR.weight),
        (_compat_sees("torch", "Tensor._backward_hooks"), _compat_sees("torch", "Tensor._post_accumulate_grad_hooks")),
    ),
    "fsdp1_flattened": Case(
        _real_fsdp1_flattened,
        lambda: compat.fsdp1_flattened(_LINEAR.weight),
        (_deleted("torch.distributed.fsdp._common_utils", "FSDP_FLATTENED"),),
    ),
    "fsdp2_managed": Case(
        _real_fsdp2_managed,
        compat.fsdp2_managed,
        (
            _deleted("torch.distributed._composable_state", "_module_state_mapping"),
            _fsdp_state_without_param_group,
        ),
    ),
    "fsdp2_param_homes": Case(
        _real_fsdp2_param_homes,
        lambda: compat.fsdp2_param_homes(types.SimpleNamespace()),
        (_init_replaced(lambda: _fsdp_param_module().FSDPParam),),
    ),
    "dtensor_local_shape_and_offset": Case(
        _real_dtensor_local_shape_and_offset,
        lambda: compat.dtensor_local_shape_and_offset((2,), None, ()),
        (_deleted("torch.distributed.tensor._utils", "compute_local_shape_and_global_offset"),),
    ),
    "zero_optimizer_class": Case(
        _real_zero_optimizer_class,
        lambda: compat.zero_optimizer_class(_zero_optimizer()),
        (_init_replaced(lambda: type(_zero_optimizer())),),
    ),
    "accelerate_shared_state": Case(
        _real_accelerate_shared_state,
        lambda: compat.accelerate_shared_state("GradientState"),
        (_deleted("accelerate.state", "GradientState._shared_state"),),
    ),
    "get_submodules": Case(
        _real_get_submodules,
        lambda: compat.get_submodules(torch.nn.Sequential(_LINEAR), "0"),
        (_deleted("peft.utils", "_get_submodules"),),
    ),
    "set_adapters_disabled": Case(
        _real_set_adapters_disabled,
        lambda: compat.set_adapters_disabled(types.SimpleNamespace(), True),
        (_deleted("peft.tuners.tuners_utils", "BaseTunerLayer._disable_adapters"),),
    ),
    "add_peft_type": Case(
        _real_add_peft_type,
        lambda: compat.add_peft_type("COMPAT_PROBE"),
        (_deleted("peft.utils", "PeftType._value2member_map_"),),
    ),
    "hf_peft_config_loaded": Case(
        _real_hf_peft_config_loaded,
        lambda: compat.hf_peft_config_loaded(_LINEAR),
        (_deleted("transformers.integrations.peft", "PeftAdapterMixin._hf_peft_config_loaded"),),
    ),
    "auto_model_names": Case(
        _real_auto_model_names,
        lambda: compat.auto_model_names("AutoModel"),
        (_deleted("transformers", "AutoModel._model_mapping"),),
    ),
    "bnb_unpack_cpu_weight": Case(
        _real_bnb_unpack_cpu_weight,
        lambda: compat.bnb_unpack_cpu_weight(None, None),
        (_deleted("bitsandbytes.functional", "_convert_weight_packed_for_cpu_inverse"),),
    ),
    "caller_frame": Case(_real_caller_frame, compat.caller_frame, (_compat_sees("sys", "_getframe"),)),
    "module_initializing": Case(
        _real_module_initializing,
        lambda: compat.module_initializing(json),
        (_deleted("peft_stoc.compat.libraries", "__spec__._initializing"),),
    ),
}
REMOVALS = [(name, index) for name, case in CASES.items() for index in range(len(case.removals))]


def test_every_accessor_has_a_guard_and_every_guard_a_test():
    helpers = {"installed_version"}
    accessors = {
        name
        for module in ACCESSOR_MODULES
        for name, value in vars(module).items()
        if inspect.isfunction(value) and value.__module__ == module.__name__ and not name.startswith("_")
    } - helpers
    guarded = [name for guard in GUARDS.values() for name in guard.accessors]
    assert sorted(guarded) == sorted(accessors)  # each accessor under exactly one guard
    assert all(getattr(compat, name) is not None for name in accessors)  # and reached as compat.<name>
    assert set(CASES) == set(GUARDS)
    assert all(guard.library in compat.SUPPORTED for guard in GUARDS.values())


@pytest.mark.parametrize("name", sorted(GUARDS))
def test_guard_passes_and_the_accessor_reaches_the_real_thing(name, monkeypatch):
    guard = GUARDS[name]
    assert guard.check(), f"{guard} fails on the installed {guard.library} {compat.installed_version(guard.library)}"
    CASES[name].real(monkeypatch)
    assert guard.passed  # checked once; afterwards a plain attribute read


@pytest.mark.parametrize(("name", "index"), REMOVALS)
def test_without_the_private_name_the_accessor_raises_a_clear_error(name, index, monkeypatch):
    guard = GUARDS[name]
    monkeypatch.setattr(guard, "passed", False)  # as in a fresh process
    CASES[name].removals[index](monkeypatch)
    assert not guard.check()
    with pytest.raises(IncompatibleLibrary) as raised:
        CASES[name].call()
    message = str(raised.value)
    assert raised.value.guard is guard
    for part in (guard.library, compat.installed_version(guard.library), guard.private, guard.purpose):
        assert part in message
    assert compat.SUPPORTED[guard.library] in message and "peft-stoc" in message
    monkeypatch.undo()
    assert guard.check()  # the name is back: the guard passes again


def test_a_passed_guard_is_not_checked_again(monkeypatch):
    guard = GUARDS["tensor_version"]
    calls = []
    monkeypatch.setattr(guard, "passed", False)
    monkeypatch.setattr(guard, "condition", lambda: calls.append(1) or True)
    for _ in range(3):
        compat.tensor_version(torch.zeros(1))
    assert calls == [1]


def test_the_error_says_what_to_install():
    guard = GUARDS["get_submodules"]
    message = str(IncompatibleLibrary(guard))
    assert "pip install 'peft>=0.21,<0.22'" in message
    assert "use Python >=3.10" in str(IncompatibleLibrary(GUARDS["caller_frame"]))


def test_the_error_is_chained_to_what_the_check_met(monkeypatch):
    guard = GUARDS["get_submodules"]
    monkeypatch.setattr(guard, "passed", False)
    _deleted("peft.utils", "_get_submodules")(monkeypatch)
    with pytest.raises(IncompatibleLibrary) as raised:
        compat.get_submodules(torch.nn.Sequential(_LINEAR), "0")
    assert isinstance(raised.value.__cause__, AttributeError)

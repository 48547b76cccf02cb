"""Every private name of torch, accelerate, PEFT, transformers, bitsandbytes and Python that peft-stoc uses.

Each accessor (in `torch_internals` and `libraries`, all reached as `compat.<name>`) reaches one such name where no
public API does what StocTuning needs. Each has a `Guard` (`guards`): the condition that the name is there as the code
expects, checked when the accessor is first used (afterwards the check is one attribute read). A failed check raises
`IncompatibleLibrary`, which names the library, its installed version, the private name, what peft-stoc needs it for
and the versions it was written against, instead of an `AttributeError` deep inside a training step. `GUARDS` lists
every guard.
"""

from .guards import GUARDS, SUPPORTED, Guard, IncompatibleLibrary, installed_version
from .libraries import (
    accelerate_shared_state,
    add_peft_type,
    auto_model_names,
    bnb_unpack_cpu_weight,
    caller_frame,
    get_submodules,
    hf_peft_config_loaded,
    module_initializing,
    set_adapters_disabled,
)
from .torch_internals import (
    ForeachGradOps,
    dtensor_local_shape_and_offset,
    foreach_grad_ops,
    foreach_norm,
    fsdp1_flattened,
    fsdp2_managed,
    fsdp2_param_homes,
    function_mode_enabled,
    make_wrapper_subclass,
    module_children,
    module_hook_tables,
    module_parameters,
    tensor_hook_tables,
    tensor_version,
    zero_optimizer_class,
)

__all__ = [
    "ForeachGradOps",
    "GUARDS",
    "Guard",
    "IncompatibleLibrary",
    "SUPPORTED",
    "accelerate_shared_state",
    "add_peft_type",
    "auto_model_names",
    "bnb_unpack_cpu_weight",
    "caller_frame",
    "dtensor_local_shape_and_offset",
    "foreach_grad_ops",
    "foreach_norm",
    "function_mode_enabled",
    "fsdp1_flattened",
    "fsdp2_managed",
    "fsdp2_param_homes",
    "get_submodules",
    "hf_peft_config_loaded",
    "installed_version",
    "make_wrapper_subclass",
    "module_children",
    "module_hook_tables",
    "module_initializing",
    "module_parameters",
    "set_adapters_disabled",
    "tensor_hook_tables",
    "tensor_version",
    "zero_optimizer_class",
]

"""StocTuning's `PeftModel` classes: the entry points where PEFT offers a tuner no hook, extended for its adapters.

A PEFT model whose tuner is StocTuning becomes an instance of a subclass of its task's class (for instance
`StocTuningPeftModelForCausalLM(PeftModelForCausalLM)`) the moment PEFT attaches the tuner: `PeftModel.__init__`
sets `self.base_model`, and torch's module-registration hook (`adopt`) changes that one instance's class. `PeftModel`
itself is left as PEFT defines it, so models of other methods never meet this code, and `isinstance` checks
(transformers, TRL, accelerate) still see the task's class. The overrides:

* `save_pretrained`: refuses pickle, adapter names that are not plain folder names, and weights changed outside
  intercepted steps; lets PEFT write into a staged folder, adds the header metadata (format, counts, base
  fingerprint) and the model card section, then swaps the folder in whole (`atomic_folder.staged_folder`).
* `load_adapter` (also reached by `PeftModel.from_pretrained` and `AutoPeftModel*.from_pretrained`): checks the
  adapter name and config, puts back a folder an interrupted save left moved away, then reads and validates the
  whole file — header limits, readability, every tensor, the base fingerprint, values in range of the base dtypes —
  before anything is touched; a load that fails anyway is undone (`transactions.Transactions.attaching`), down to the
  caller's base for a failed `from_pretrained`. `ignore_base_mismatch=True` applies an adapter to another base on
  purpose.
* `add_adapter`: attaching is a transaction too (checks first, everything undone on failure).
* `push_to_hub`: transformers' version replaces the README with a bare card; this one uploads the adapter with
  its model card.
* `get_nb_trainable_parameters` / `print_trainable_parameters`: PEFT counts every parameter that requires a gradient
  (nearly the whole model for StocTuning); these count what a step trains — k entries drawn from the candidates,
  plus the heads — and the printed line names the candidates too.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os

from peft import PeftConfig, PeftModel
from peft.utils.other import ModulesToSaveWrapper
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

from ..adapter_files import adapter_file, atomic_folder, hub, validation
from ..adapter_files.transactions import check_adapter_name, check_new_adapter
from ..quantized import bnb_weights as quantized
from ..tuner.model import StocTuningModel, detached_copies

_HUB_KWARGS = ("subfolder", "revision", "cache_dir", "token", "force_download", "local_files_only")


def _bound(method, args, kwargs) -> inspect.BoundArguments:
    bound = inspect.signature(method).bind(*args, **kwargs)
    bound.apply_defaults()
    return bound


def _adapter_path(model_id: str, hub_kwargs: dict) -> str:
    """Local path of the adapter file, downloading it (to the Hub cache PEFT uses next) when needed."""
    subfolder = hub_kwargs.get("subfolder")
    local = os.path.join(model_id, subfolder or "", adapter_file.WEIGHTS_NAME)
    if os.path.isfile(local) or os.path.isdir(model_id):
        return local
    from huggingface_hub import hf_hub_download

    return hf_hub_download(model_id, adapter_file.WEIGHTS_NAME, **hub_kwargs)


def _recover(model_id, subfolder: str | None) -> None:
    """Finish or undo what an interrupted save left in a local adapter folder (see `atomic_folder`)."""
    atomic_folder.recover_for_reading(os.path.join(os.fspath(model_id), subfolder or ""))


def _head_specs(tuner, config) -> dict[str, tuple[tuple[int, ...], object]]:
    """File keys, shapes and dtypes of the modules_to_save tensors the model expects."""
    wanted = list(config.modules_to_save or [])
    specs = {}
    for name, module in tuner.model.named_modules():
        # PEFT's own rule for modules_to_save is a plain suffix match.
        if not name or not any(name.endswith(w) for w in wanted):
            continue
        source = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
        for key, value in source.state_dict().items():
            specs[f"{adapter_file.MODEL_PREFIX}{name}.{key}"] = (tuple(value.shape), value.dtype)
    return specs


def _check_base(tuner, file: adapter_file.AdapterFile, config, ignore_base_mismatch: bool) -> None:
    """The fingerprint in the header against this base, before any tensor is read: a file
    for another base is named as such, not by the first tensor that does not fit."""
    recorded = file.fingerprint
    if recorded is None:
        raise adapter_file.AdapterFileError(f"{file.path} has no base-model fingerprint in its header.")
    tuner.refuse_other_base(recorded, config, file.path, ignore_base_mismatch)


def _validate(tuner, path: str, config, ignore_base_mismatch: bool):
    """Everything in the file at `path` against the model, before any of it is applied (`validation.validate`, the
    one validation the command line uses too); returns the file."""
    params = tuner.adapter_params("", config)
    expected = adapter_file.Expected(
        numels={name: p.numel() for name, p in params.items()},
        dtypes={name: p.dtype for name, p in params.items()},
        heads=_head_specs(tuner, config),
    )
    return validation.validate(
        path,
        config,
        expected,
        check_base=lambda file: _check_base(tuner, file, config, ignore_base_mismatch),
        base_values=tuner.stoc_state.patch_base_values(params),
    )


@contextlib.contextmanager
def _saved_fields_restored(configs: dict):
    """PEFT writes the live config object: the fingerprint and counts set for the file (`_get_adapter_state_dict`)
    describe that file only. Left on the live config, which the user may share with other models (one
    `StocTuningConfig` for several `get_peft_model` calls), they would be read as the record of a saved adapter by a
    later load into any of them."""
    before = {name: (config.base_fingerprint, config.saved_counts) for name, config in configs.items()}
    try:
        yield
    finally:
        for name, (fingerprint_, counts) in before.items():
            if name in configs:
                configs[name].base_fingerprint, configs[name].saved_counts = fingerprint_, counts


class StocTuningPeftModel(PeftModel):
    """The overrides every StocTuning PEFT model carries; `peft_class` puts them before the task's class."""

    # `base_model` is the StocTuning tuner: only models given one get this class (`adopt`).

    def __deepcopy__(self, memo):
        # What `copy.deepcopy` does without a `__reduce_ex__` of our own (below): the tuner's `__setstate__` retires
        # the copied step engines.
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__dict__, memo))
        return copied

    def __reduce_ex__(self, protocol):
        """`torch.save(model)` and pickle: what is written is a copy of the model without step engines (their hooks
        and optimizer belong to this process's training); the loaded model starts its own. The copy is transient:
        pickling takes as much memory again as the model."""
        if any(quantized.kind(p) for p in self.parameters()):
            raise TypeError(
                "A StocTuning model on a bitsandbytes base cannot be pickled: pickle turns bitsandbytes' weights "
                "(Params4bit, Int8Params) into plain tensors, which StocTuning can no longer read as quantized "
                "weights. "
                "Save the adapter with `save_pretrained` and load it onto the quantized base with "
                "`PeftModel.from_pretrained` instead."
            )
        with detached_copies():
            detached = copy.deepcopy(self)
        return super(StocTuningPeftModel, detached).__reduce_ex__(protocol)  # the copy's state, as object pickles it

    def save_pretrained(self, *args, **kwargs) -> None:
        tuner = self.base_model
        call = _bound(super().save_pretrained, args, kwargs)
        if not call.arguments["safe_serialization"]:
            raise ValueError("StocTuning adapters are saved as safetensors only; drop `safe_serialization=False`.")
        names = call.arguments["selected_adapters"] or list(self.peft_config)
        for name in names:
            check_adapter_name(name)
        tuner.verify_integrity()
        if not call.arguments["is_main_process"]:
            return super().save_pretrained(*call.args, **call.kwargs)  # PEFT writes no file there
        directory = os.fspath(call.arguments["save_directory"])
        with _saved_fields_restored(self.peft_config), atomic_folder.staged_folder(directory) as stage:
            call.arguments["save_directory"] = stage
            super().save_pretrained(*call.args, **call.kwargs)
            for name in names:
                path = os.path.join(hub.adapter_folder(stage, name), adapter_file.WEIGHTS_NAME)
                adapter_file.add_metadata(path, tuner.file_metadata(name))
            hub.write_model_card(
                stage,
                {name: self.peft_config[name] for name in names},
                load_from=directory,
                architectures=getattr(getattr(tuner.model, "config", None), "architectures", None),
            )

    def add_adapter(self, adapter_name: str, peft_config, *args, **kwargs) -> None:
        with self.base_model.attaching(adapter_name, peft_config):
            super().add_adapter(adapter_name, peft_config, *args, **kwargs)
        check_new_adapter(adapter_name, peft_config)  # the task head's names PEFT appended, once each

    def load_adapter(self, model_id, adapter_name, *args, ignore_base_mismatch: bool = False, **kwargs):
        tuner = self.base_model
        check_adapter_name(adapter_name)
        fresh = tuner.is_fresh(adapter_name)  # injected for this load (PeftModel.from_pretrained) or not there yet
        # What this load notes of the file (its step count, the file validated) is undone with it.
        notes = tuner.load_notes(adapter_name)
        try:
            hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if kwargs.get(key) is not None}
            _recover(model_id, hub_kwargs.get("subfolder"))
            config = self.peft_config.get(adapter_name) or PeftConfig.from_pretrained(model_id, **hub_kwargs)
            check_new_adapter(adapter_name, config)
            file = _validate(tuner, _adapter_path(str(model_id), hub_kwargs), config, ignore_base_mismatch)
            tuner.note_validated(adapter_name, file)
            if adapter_name in self.peft_config:
                return super().load_adapter(model_id, adapter_name, *args, **kwargs)
            with tuner.attaching(adapter_name, config):
                return super().load_adapter(model_id, adapter_name, *args, **kwargs)
        except BaseException:
            if fresh and adapter_name in self.peft_config:
                tuner.abandon_load(adapter_name)  # the model, and the base under it, as they were before
            tuner.restore_load_notes(adapter_name, notes)
            raise

    def push_to_hub(self, repo_id: str, *args, **kwargs):
        kwargs.pop("max_shard_size", None)  # an adapter is one small file
        return hub.push_to_hub(self, repo_id, *args, **kwargs)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """(trainable, all) as one step trains: the k entries drawn, plus the modules_to_save."""
        return self.base_model.stoc_nb_trainable_parameters()

    def print_trainable_parameters(self) -> None:
        counts = self.base_model.stoc_parameter_counts()
        per_step, all_params = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {per_step:,d} per step (k = {counts['k']:,d} entries drawn from "
            f"{counts['candidates']:,d} candidates, {counts['head']:,d} in modules_to_save) || "
            f"all params: {all_params:,d} || trainable%: {100 * per_step / all_params:.4f}"
        )


_CLASSES: dict[type, type] = {PeftModel: StocTuningPeftModel}


def peft_class(task_class: type) -> type:
    """The StocTuning subclass of a PEFT model class, made once per class."""
    if issubclass(task_class, StocTuningPeftModel):
        return task_class
    made = _CLASSES.get(task_class)
    if made is None:
        name = f"StocTuning{task_class.__name__}"
        made = _CLASSES[task_class] = type(name, (StocTuningPeftModel, task_class), {"__module__": __name__})
        globals()[name] = made  # pickle finds a class by its module and name
    return made


def __getattr__(name: str) -> type:
    """`StocTuningPeftModelForCausalLM` and the like, made on first use: how pickle finds the class of a saved model
    in a process that has not made it yet."""
    import peft.peft_model

    task_class = (
        getattr(peft.peft_model, name.removeprefix("StocTuning"), None) if name.startswith("StocTuning") else None
    )
    if isinstance(task_class, type) and issubclass(task_class, PeftModel):
        return peft_class(task_class)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def adopt(module: nn.Module, name: str, submodule: nn.Module | None) -> None:
    """Module-registration hook: a PEFT model given a StocTuning tuner becomes an instance of its StocTuning class."""
    if name == "base_model" and isinstance(submodule, StocTuningModel) and isinstance(module, PeftModel):
        module.__class__ = peft_class(type(module))


_registration = globals().get("_registration")  # kept when this module is reloaded


def install() -> None:
    """Register `adopt` once per process (a reload of peft_stoc replaces the earlier registration)."""
    global _registration
    if _registration is not None:
        _registration.remove()
    _registration = register_module_module_registration_hook(adopt)

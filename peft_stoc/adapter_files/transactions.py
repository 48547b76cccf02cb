"""Attaching an adapter is a transaction (a part of `model.StocTuningModel`).

`check_adapter_name` and `check_new_adapter` run before anything is attached, at every entry point (`get_peft_model`,
`PeftModel.from_pretrained`, `AutoPeftModel*`, `inject_adapter_in_model`, `add_adapter`, `load_adapter`,
`add_weighted_adapter`); `ModelState` records what attaching may change in the model (its module tree, hooks,
`requires_grad` flags, attributes) and puts it back on any exception, so a failed call leaves the caller's model as it
was.
"""

from __future__ import annotations

import contextlib
import copy
import ntpath
import weakref

from torch import nn

from .. import compat
from . import validation

# -- checks before anything is attached ---------------------------------------------------------------------------
_MODULE_DICT = nn.ModuleDict()  # adapter names become keys of module dicts (the adapters' slots, the heads' copies)


def check_adapter_name(name) -> None:
    """Adapter names become module keys and, when saved, folder names: refuse names that break either.

    The one check of adapter names, run by every entry point before anything is attached."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"Adapter name {name!r} is not usable: give a non-empty string such as 'default'.")
    bad = next((repr(c) for c in (".", "/", "\\", "\0") if c in name), None)
    if bad is None and ntpath.splitdrive(name)[0]:
        bad = "a drive"
    if bad is not None:
        raise ValueError(
            f"Adapter name {name!r} contains {bad}: adapter names are module keys and, when saved, folder names "
            "inside the save folder, so they may not contain '.', '/', '\\' or NUL, nor be a path."
        )
    if hasattr(_MODULE_DICT, name) or hasattr(nn.Module, name):
        raise ValueError(
            f"Adapter name {name!r} is the name of a torch Module attribute; adapter names become module "
            "keys, so pick another name (e.g. 'default', 'task_a')."
        )


def check_new_adapter(adapter_name, config) -> None:
    """Everything about a new adapter that can be checked before it is attached: its name, the fields PEFT uses
    while attaching it, and the counts a saved config carries. `modules_to_save` loses repeated names (PEFT appends
    the task head's names each time a config is attached, so a saved config would grow at every reload)."""
    check_adapter_name(adapter_name)
    validation.check_config(config, source=f"adapter {adapter_name!r}")
    heads = getattr(config, "modules_to_save", None)
    if heads is not None:
        heads[:] = dict.fromkeys(heads)  # in place: PEFT's task classes hold the same list


class ModelState:
    """What attaching an adapter may change in a model, recorded so that it can be put back: every module's children,
    hooks and attribute names, every parameter's `requires_grad` flag and hooks. Weights are not recorded (attaching
    does not change them; loading restores them through the record of originals).

    Modules and parameters are held weakly: a record kept while the model lives on (for a failed load into a fresh
    tuner) keeps nothing alive that the model let go of (FSDP2 replaces whole parameters with shards)."""

    def __init__(self, model: nn.Module):
        self.modules = [
            (
                weakref.ref(module),
                set(vars(module)),
                {
                    name: None if child is None else weakref.ref(child)
                    for name, child in compat.module_children(module).items()
                },
                {table: dict(hooks or {}) for table, hooks in compat.module_hook_tables(module).items()},
            )
            for module in model.modules()
        ]
        self.params = [
            (
                weakref.ref(param),
                param.requires_grad,
                {table: dict(hooks or {}) for table, hooks in compat.tensor_hook_tables(param).items()},
            )
            for param in model.parameters()
        ]

    def restore(self) -> None:
        for module_ref, attributes, children, hooks in self.modules:
            module = module_ref()
            if module is None:
                continue
            for name in [n for n in vars(module) if n not in attributes]:
                del module.__dict__[name]
            alive = {name: None if ref is None else ref() for name, ref in children.items()}
            registered = compat.module_children(module)
            registered.clear()
            registered.update(
                {name: child for name, child in alive.items() if child is not None or children[name] is None}
            )
            _put_back(compat.module_hook_tables(module), hooks)
        for param_ref, requires_grad, hooks in self.params:
            param = param_ref()
            if param is None:
                continue
            param.requires_grad_(requires_grad)
            _put_back(compat.tensor_hook_tables(param), hooks)


def _put_back(tables: dict, saved: dict) -> None:
    """Each hook table as it was recorded (the tables are torch's own dicts: emptied and refilled in place)."""
    for table, hooks in saved.items():
        current = tables[table]
        if current is not None:
            current.clear()
            current.update(hooks)


class Transactions:
    """Attaching adapters to `StocTuningModel` as transactions, and undoing a failed load."""

    def __init__(self, model, peft_config, adapter_name, *args, **kwargs):
        # Reached by get_peft_model, PeftModel.from_pretrained, AutoPeftModel* and inject_adapter_in_model: the
        # tuner is made and its first adapter attached in one step, undone as a whole if any part fails.
        config = peft_config.get(adapter_name) if isinstance(peft_config, dict) else peft_config
        check_new_adapter(adapter_name, config)
        before = ModelState(model)
        try:
            super().__init__(model, peft_config, adapter_name, *args, **kwargs)
        except BaseException:
            self._detach(before)
            raise
        self.__dict__["_state_before"] = before  # a failed load into this fresh tuner puts the caller's model back

    def _detach(self, before: ModelState) -> None:
        """Undo everything this tuner attached to its model: engines, weights, module tree, hooks, flags."""
        if "_stoc_layer" in self.__dict__:
            with contextlib.suppress(Exception):  # put back whatever can be, whatever state the failure left
                self._forget_engines()
            with contextlib.suppress(Exception):
                self.stoc_state.restore(self.base_params())
            with contextlib.suppress(Exception):
                self._remove_layer()
        before.restore()

    @contextlib.contextmanager
    def attaching(self, adapter_name: str, config=None):
        """Attach a further adapter (add_adapter, load_adapter, add_weighted_adapter) as a transaction: checks first,
        and on any exception the model and the tuner's tables go back to what they were."""
        if config is not None:
            check_new_adapter(adapter_name, config)
        else:
            check_adapter_name(adapter_name)
        before = ModelState(self.model)
        tables = (
            dict(self.peft_config),
            list(self.targeted_module_names),
            copy.copy(self.active_adapter),
            dict(self._adapters),
            set(self._awaiting),
            dict(self._validated),
            dict(self._steps_loaded),
            dict(self.stoc_state.stoc_adapters),
        )
        try:
            yield
        except BaseException:
            self._forget_adapter(adapter_name, before, tables)
            raise

    def _forget_adapter(self, adapter_name: str, before: ModelState, tables) -> None:
        peft_config, targeted, active, adapters, awaiting, validated, steps, slots = tables
        layer = self.stoc_state
        if adapter_name not in adapters:
            with contextlib.suppress(Exception):
                self._drop_engine(adapter_name)
        if adapter_name in layer.applied or any(a not in slots for a in layer.merged_adapters):
            layer.restore(self.base_params())  # its deltas must not stay in the weights
            layer.merged_adapters = [a for a in layer.merged_adapters if a in slots]
        before.restore()
        self.peft_config.clear()
        self.peft_config.update(peft_config)
        self.targeted_module_names[:] = targeted
        self.active_adapter = active
        for name, value in ((self._adapters, adapters), (self._steps_loaded, steps), (self._validated, validated)):
            name.clear()
            name.update(value)
        self._awaiting.clear()
        self._awaiting.update(awaiting)
        self._apply_adapter_state()

    def add_weighted_adapter(self, adapters, weights, adapter_name, *args, **kwargs) -> None:
        with self.attaching(adapter_name):
            return super().add_weighted_adapter(adapters, weights, adapter_name, *args, **kwargs)

    # -- a failed load ------------------------------------------------------------------------------------------
    def is_fresh(self, adapter_name: str) -> bool:
        """Not an adapter yet, or one that was only just injected: never trained, loaded or combined."""
        if adapter_name not in self.stoc_state.stoc_adapters:
            return True
        engine = self._engine_of(adapter_name)
        delta = self.stoc_state.stoc_adapters[adapter_name].delta
        untouched = not delta.tensors and adapter_name not in self._steps_loaded
        return untouched and (engine is None or engine.stats.step == 0)

    def abandon_load(self, adapter_name: str) -> None:
        """Undo the injection of an adapter whose loading failed. When it is the only adapter and this tuner was made
        for it (a failed `PeftModel.from_pretrained`), the base model goes back to exactly what the caller passed in:
        module types, hooks, `requires_grad` flags, attributes, weights."""
        if adapter_name not in self.stoc_state.stoc_adapters:
            self.peft_config.pop(adapter_name, None)
            return
        before = self.__dict__.get("_state_before")
        if len(self.stoc_state.stoc_adapters) > 1 or before is None:
            self.delete_adapter(adapter_name)
            return
        self._detach(before)

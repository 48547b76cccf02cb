"""What a StocTuning adapter file holds and how it is checked against the model: the tensors PEFT saves and loads
through the tuner's hooks, the counts and fingerprint that go with them, and the checks before anything is applied.

Attaching an adapter is a transaction. `check_adapter_name` and `check_new_adapter` run before anything is attached,
at every entry point (`get_peft_model`, `PeftModel.from_pretrained`, `AutoPeftModel*`, `inject_adapter_in_model`,
`add_adapter`, `load_adapter`, `add_weighted_adapter`); `ModelState` records what attaching may change in the model
(its module tree, hooks, `requires_grad` flags, attributes) and puts it back on any exception, so a failed call
leaves the caller's model as it was.
"""

from __future__ import annotations

import contextlib
import copy
import json
import ntpath
import weakref

import torch
from torch import nn

from .. import compat
from ..distributed import shards
from ..quantized.overlay import Overlay
from ..training.audit import BYPASS_HINT
from ..tuner.candidates import find_candidates
from ..tuner.layer import find_tuner
from . import adapter_file, fingerprint

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
    adapter_file.check_config(config, source=f"adapter {adapter_name!r}")
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
            tables = compat.module_hook_tables(module)
            for table, saved in hooks.items():
                current = tables[table]
                if current is not None:
                    current.clear()
                    current.update(saved)
        for param_ref, requires_grad, hooks in self.params:
            param = param_ref()
            if param is None:
                continue
            param.requires_grad_(requires_grad)
            tables = compat.tensor_hook_tables(param)
            for table, saved in hooks.items():
                current = tables[table]
                if current is not None:
                    current.clear()
                    current.update(saved)


class AdapterFiles:
    """Adapter-file hooks and checks of `StocTuningModel`, and attaching adapters as transactions."""

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
                self.stoc_layer.restore(self._base_params())
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
            set(self._validated),
            dict(self._steps_loaded),
            dict(self.stoc_layer.stoc_adapters),
        )
        try:
            yield
        except BaseException:
            self._forget_adapter(adapter_name, before, tables)
            raise

    def _forget_adapter(self, adapter_name: str, before: ModelState, tables) -> None:
        peft_config, targeted, active, adapters, awaiting, validated, steps, slots = tables
        layer = self.stoc_layer
        if adapter_name not in adapters:
            with contextlib.suppress(Exception):
                self._drop_engine(adapter_name)
        if adapter_name in layer.applied or any(a not in slots for a in layer.merged_adapters):
            layer.restore(self._base_params())  # its deltas must not stay in the weights
            layer.merged_adapters = [a for a in layer.merged_adapters if a in slots]
        before.restore()
        self.peft_config.clear()
        self.peft_config.update(peft_config)
        self.targeted_module_names[:] = targeted
        self.active_adapter = active
        for name, value in ((self._adapters, adapters), (self._steps_loaded, steps)):
            name.clear()
            name.update(value)
        for name, value in ((self._awaiting, awaiting), (self._validated, validated)):
            name.clear()
            name.update(value)
        self._apply_adapter_state()

    def add_weighted_adapter(self, adapters, weights, adapter_name, *args, **kwargs) -> None:
        with self.attaching(adapter_name):
            return super().add_weighted_adapter(adapters, weights, adapter_name, *args, **kwargs)

    # -- adapter files ---------------------------------------------------------------------------------------
    def _adapter_params(self, adapter_name: str, config=None) -> dict[str, nn.Parameter]:
        if config is None:
            return {c.name: c.param for c in self._adapters[adapter_name].candidates}
        return {c.name: c.param for c in find_candidates(self.model, config, overlay_for=self._overlay_reader)}

    def _overlay_reader(self, name: str, module: nn.Module) -> Overlay:
        """The overlay through which a file is checked against the quantized weight `name`: its own if an adapter
        tunes it, else one that reads the weight without being hooked onto its layer."""
        for overlay in self.stoc_layer.overlays.values():
            if overlay.name == name:
                return overlay
        return Overlay(module, name)

    def _adapter_numels(self, adapter_name: str, config=None) -> dict[str, int]:
        """Entries per candidate tensor: what a delta's indices are checked against."""
        return {name: p.numel() for name, p in self._adapter_params(adapter_name, config).items()}

    def _fingerprint_params(self, config) -> dict[str, nn.Parameter]:
        """Every base parameter outside the fully trained heads, whatever `target_modules` chose: adapters of one
        base share a fingerprint."""
        whole = copy.copy(config)
        whole.target_modules = whole.exclude_modules = None
        return {c.name: c.param for c in find_candidates(self.model, whole, overlay_for=self._overlay_reader)}

    def verify_integrity(self) -> None:
        """Raise if the base changed outside an intercepted optimizer step (an adapter saved now would be wrong)."""
        engine = self.stoc_engine()
        if engine is not None:
            engine.audit.verify(context=BYPASS_HINT)

    def counts(self, adapter_name: str) -> dict[str, int]:
        """Entries changed, tensors changed, candidate entries, k and optimizer steps of `adapter_name`."""
        delta = self.adapter_delta(adapter_name)
        k = self._adapters[adapter_name].k
        return {
            "changed": delta.num_changed,
            "tensors": len(delta.tensors),
            "candidates": sum(c.numel for c in self._adapters[adapter_name].candidates),
            "k": k,
            "step": self._step_of(adapter_name),
        }

    def check_base(self, config, source: str, ignore_base_mismatch: bool = False) -> None:
        """Refuse to load onto a base whose fingerprint differs from the one `config` was saved with."""
        if config.base_fingerprint is not None:  # None: a state dict never saved through save_pretrained
            self.refuse_other_base(config.base_fingerprint, config, source, ignore_base_mismatch)

    def refuse_other_base(self, recorded: dict, config, source: str, ignore_base_mismatch: bool = False) -> None:
        """Raise unless the fingerprint `recorded` (of a file or a config) is that of this base."""
        whole = self._fingerprint_params(config)
        reason = fingerprint.mismatch(recorded, whole, self.stoc_layer.patch_base_values(whole))
        if reason is not None and not ignore_base_mismatch:
            raise adapter_file.AdapterFileError(
                f"{source} was made for another base model: {reason}. Load it onto the base it was trained on "
                f"(base_model_name_or_path={config.base_model_name_or_path!r}), or pass "
                "`ignore_base_mismatch=True` to `load_adapter` to apply it anyway."
            )

    def file_metadata(self, adapter_name: str) -> dict[str, str]:
        """Header metadata of `adapter_name`'s file: format, counts and the base-model fingerprint."""
        params = self._adapter_params(adapter_name)
        delta = self.adapter_delta(adapter_name)
        counts = self.counts(adapter_name)
        shapes = {name: list(params[name].shape) for name in delta.tensors}
        return {
            adapter_file.META_FORMAT: adapter_file.FORMAT_VERSION,
            adapter_file.META_COUNTS: json.dumps(counts),
            adapter_file.META_SHAPES: json.dumps(shapes, separators=(",", ":")),
            adapter_file.META_FINGERPRINT: fingerprint.to_json(self._fingerprint(self.peft_config[adapter_name])),
        }

    def _fingerprint(self, config) -> dict:
        whole = self._fingerprint_params(config)
        if shards.shard_group(whole.values()) is None:
            return fingerprint.compute(whole, self.stoc_layer.patch_base_values(whole))
        # FSDP2: base values are read where they are held and summed over the processes, once (the base does not
        # change); the main process then writes the file's header without another collective.
        key = tuple(sorted(whole))
        if key not in self._fingerprints:
            self._fingerprints[key] = fingerprint.compute(whole, self.stoc_layer.patch_base_values(whole))
        return self._fingerprints[key]

    # -- save / load hooks (called by PEFT's get/set_peft_model_state_dict) --------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        tuner = find_tuner(model, required=True)
        delta = tuner.adapter_delta(adapter_name)
        whole_heads = tuner.__dict__.get("_whole_heads", {})
        for key, value in state_dict.items():
            # FSDP2: the fully trained copies (modules_to_save) PEFT takes from this state dict next are shards. They
            # were gathered with the state dict when every process took it (the main process may save alone).
            if f".modules_to_save.{adapter_name}." in key and shards.is_shard(value):
                suffix = next((s for s in whole_heads if key == s or key.endswith("." + s)), None)
                state_dict[key] = whole_heads.pop(suffix) if suffix is not None else value.full_tensor()
        # PEFT saves this config object right after the tensors: the fingerprint and counts go with it.
        config.base_fingerprint = tuner._fingerprint(config)
        config.saved_counts = tuner.counts(adapter_name)
        return adapter_file.delta_tensors(delta, tuner._adapter_numels(adapter_name), getattr(torch, config.save_dtype))

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key if adapter_file.is_delta_key(key) else super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        tuner = find_tuner(model, required=True)
        if adapter_name not in tuner._validated:
            tuner.check_base(config, source=f"the state dict of adapter {adapter_name!r}")
        ours = {k: v for k, v in state_dict.items() if adapter_file.is_delta_key(k)}
        rest = {k: v for k, v in state_dict.items() if k not in ours}
        delta = adapter_file.parse_delta(ours, tuner._adapter_numels(adapter_name))
        # A load through `load_adapter` noted the file's own counts; the config may be a live one reused for it.
        if adapter_name not in tuner._validated and isinstance(config.saved_counts, dict):
            tuner.note_loaded(adapter_name, config.saved_counts)
        tuner.set_adapter_delta(adapter_name, delta)
        tuner._awaiting.discard(adapter_name)
        tuner._validated.discard(adapter_name)
        return rest

    # -- loading ----------------------------------------------------------------------------------------------
    def is_fresh(self, adapter_name: str) -> bool:
        """Not an adapter yet, or one that was only just injected: never trained, loaded or combined."""
        if adapter_name not in self.stoc_layer.stoc_adapters:
            return True
        engine = self._engine_of(adapter_name)
        delta = self.stoc_layer.stoc_adapters[adapter_name].delta
        untouched = not delta.tensors and adapter_name not in self._steps_loaded
        return untouched and (engine is None or engine.stats.step == 0)

    def abandon_load(self, adapter_name: str) -> None:
        """Undo the injection of an adapter whose loading failed. When it is the only adapter and this tuner was made
        for it (a failed `PeftModel.from_pretrained`), the base model goes back to exactly what the caller passed in:
        module types, hooks, `requires_grad` flags, attributes, weights."""
        if adapter_name not in self.stoc_layer.stoc_adapters:
            self.peft_config.pop(adapter_name, None)
            return
        before = self.__dict__.get("_state_before")
        if len(self.stoc_layer.stoc_adapters) > 1 or before is None:
            self.delete_adapter(adapter_name)
            return
        self._detach(before)

    def note_loaded(self, adapter_name: str, counts: dict) -> None:
        """Remember how many optimizer steps a loaded adapter had taken: its draws continue from there."""
        step = counts.get("step", 0) if isinstance(counts, dict) else 0
        self._steps_loaded[adapter_name] = step if isinstance(step, int) and step >= 0 else 0

"""What a StocTuning adapter file holds and how it is checked against the model: the tensors PEFT saves and loads
through the tuner's hooks, the counts and fingerprint that go with them, and the checks before anything is applied.
"""

from __future__ import annotations

import copy
import json

import torch
from peft.utils import _get_submodules
from peft.utils.other import AuxiliaryTrainingWrapper, ModulesToSaveWrapper
from torch import nn

from . import adapter_file, fingerprint, shards
from .audit import BYPASS_HINT
from .candidates import find_candidates
from .layer import find_tuner


class AdapterFiles:
    """Adapter-file hooks and checks of `StocTuningModel`."""

    # -- adapter files ---------------------------------------------------------------------------------------
    def _adapter_params(self, adapter_name: str, config=None) -> dict[str, nn.Parameter]:
        if config is None:
            return {c.name: c.param for c in self._adapters[adapter_name].candidates}
        return {c.name: c.param for c in find_candidates(self.model, config)}

    def _adapter_numels(self, adapter_name: str, config=None) -> dict[str, int]:
        """Entries per candidate tensor: what a delta's indices are checked against."""
        return {name: p.numel() for name, p in self._adapter_params(adapter_name, config).items()}

    def _fingerprint_params(self, config) -> dict[str, nn.Parameter]:
        """Every base parameter outside the fully trained heads, whatever `target_modules` chose: adapters of one
        base share a fingerprint."""
        whole = copy.copy(config)
        whole.target_modules = whole.exclude_modules = None
        return {c.name: c.param for c in find_candidates(self.model, whole)}

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

    def check_file(self, file: adapter_file.AdapterFile, config, ignore_base_mismatch: bool = False) -> None:
        """Validate everything in `file` against this model before any of it is applied."""
        recorded = file.fingerprint
        if recorded is None:
            raise adapter_file.AdapterFileError(f"{file.path} has no base-model fingerprint in its header.")
        self.refuse_other_base(recorded, config, file.path, ignore_base_mismatch)
        adapter_file.parse_delta(file.tensors, self._adapter_numels("", config), source=file.path)
        adapter_file.check_other_tensors(file.tensors, self._head_shapes(config), source=file.path)

    def _fingerprint(self, config) -> dict:
        whole = self._fingerprint_params(config)
        if shards.shard_group(whole.values()) is False:
            return fingerprint.compute(whole, self.stoc_layer.patch_base_values(whole))
        # FSDP2: base values are read where they are held and summed over the processes, once (the base does not
        # change); the main process then writes the file's header without another collective.
        key = tuple(sorted(whole))
        if key not in self._fingerprints:
            self._fingerprints[key] = fingerprint.compute(whole, self.stoc_layer.patch_base_values(whole))
        return self._fingerprints[key]

    def _head_shapes(self, config) -> dict[str, torch.Size]:
        """File keys and shapes of the modules_to_save tensors this model expects."""
        wanted = list(config.modules_to_save or [])
        shapes = {}
        for name, module in self.model.named_modules():
            # PEFT's own rule for modules_to_save is a plain suffix match.
            if not name or not any(name.endswith(w) for w in wanted):
                continue
            source = module.original_module if isinstance(module, ModulesToSaveWrapper) else module
            for key, value in source.state_dict().items():
                shapes[f"{adapter_file.MODEL_PREFIX}{name}.{key}"] = value.shape
        return shapes

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
        if isinstance(config.saved_counts, dict):
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
        """Undo the injection of an adapter whose loading failed. When it is the only adapter (a failed
        `PeftModel.from_pretrained`), the base model goes back to exactly what the caller passed in: module types,
        hooks, `requires_grad` flags, weights."""
        if adapter_name not in self.stoc_layer.stoc_adapters:
            self.peft_config.pop(adapter_name, None)
            return
        if len(self.stoc_layer.stoc_adapters) > 1:
            self.delete_adapter(adapter_name)
            return
        self._forget_engines()
        self.stoc_layer.restore(self._base_params())
        for key, module in list(self.model.named_modules()):
            if isinstance(module, AuxiliaryTrainingWrapper) and hasattr(module, "original_module"):
                parent, _, child = _get_submodules(self.model, key)
                setattr(parent, child, module.original_module)
        for param, requires_grad in self._requires_grad_before.values():
            param.requires_grad_(requires_grad)
        self._remove_layer()
        if "peft_config" in vars(self.model):
            del self.model.peft_config

    def note_loaded(self, adapter_name: str, counts: dict) -> None:
        """Remember how many optimizer steps a loaded adapter had taken: its draws continue from there."""
        step = counts.get("step", 0) if isinstance(counts, dict) else 0
        self._steps_loaded[adapter_name] = step if isinstance(step, int) and step >= 0 else 0

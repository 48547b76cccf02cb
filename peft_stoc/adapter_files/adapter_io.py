"""What a StocTuning adapter file holds and how it is checked against the model (a part of `model.StocTuningModel`):
the tensors PEFT saves and loads through the tuner's hooks, the counts and fingerprint that go with them, and what a
load notes of the file it validated, so that nothing is checked or parsed twice.
"""

from __future__ import annotations

import copy
import json

import torch
from torch import nn

from ..distributed import shards
from ..quantized.overlay import Overlay
from ..training.audit import BYPASS_HINT
from ..tuner.candidates import find_candidates
from ..tuner.delta import SparseDelta
from ..tuner.stoc_state import find_tuner
from . import adapter_file, file_checks, fingerprint


class AdapterFiles:
    """Adapter-file hooks and checks of `StocTuningModel`."""

    # -- adapter files ---------------------------------------------------------------------------------------
    def adapter_params(self, adapter_name: str, config=None) -> dict[str, nn.Parameter]:
        """The candidate parameters of `adapter_name` by name, or, given `config`, those an adapter of that config
        would draw from (a file to be loaded is checked against them)."""
        if config is None:
            return {c.name: c.param for c in self._adapters[adapter_name].candidates}
        return {c.name: c.param for c in find_candidates(self.model, config, overlay_for=self._overlay_reader)}

    def _overlay_reader(self, name: str, module: nn.Module) -> Overlay:
        """The overlay through which a file is checked against the quantized weight `name`: its own if an adapter
        tunes it, else one that reads the weight without being hooked onto its layer."""
        for overlay in self.stoc_state.overlays.values():
            if overlay.name == name:
                return overlay
        return Overlay(module, name)

    def adapter_numels(self, adapter_name: str, config=None) -> dict[str, int]:
        """Entries per candidate tensor: what a delta's indices are checked against."""
        return {name: p.numel() for name, p in self.adapter_params(adapter_name, config).items()}

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
        reason = fingerprint.mismatch(recorded, whole, self.stoc_state.patch_base_values(whole))
        if reason is not None and not ignore_base_mismatch:
            raise adapter_file.AdapterFileError(
                f"{source} was made for another base model: {reason}. Load it onto the base it was trained on "
                f"(base_model_name_or_path={config.base_model_name_or_path!r}), or pass "
                "`ignore_base_mismatch=True` to `load_adapter` to apply it anyway."
            )

    def file_metadata(self, adapter_name: str) -> dict[str, str]:
        """Header metadata of `adapter_name`'s file: format, counts and the base-model fingerprint."""
        params = self.adapter_params(adapter_name)
        delta = self.adapter_delta(adapter_name)
        counts = self.counts(adapter_name)
        shapes = {name: list(params[name].shape) for name in delta.tensors}
        return {
            adapter_file.META_FORMAT: adapter_file.FORMAT_VERSION,
            adapter_file.META_COUNTS: json.dumps(counts),
            adapter_file.META_SHAPES: json.dumps(shapes, separators=(",", ":")),
            adapter_file.META_FINGERPRINT: fingerprint.to_json(self.base_fingerprint(self.peft_config[adapter_name])),
        }

    def base_fingerprint(self, config) -> dict:
        """The fingerprint of this base that files of adapters with `config` record (`fingerprint.compute`)."""
        whole = self._fingerprint_params(config)
        if shards.shard_group(whole.values()) is None:
            return fingerprint.compute(whole, self.stoc_state.patch_base_values(whole))
        # FSDP2: base values are read where they are held and summed over the processes, once (the base does not
        # change); the main process then writes the file's header without another collective.
        key = tuple(sorted(whole))
        if key not in self._fingerprints:
            self._fingerprints[key] = fingerprint.compute(whole, self.stoc_state.patch_base_values(whole))
        return self._fingerprints[key]

    # -- save / load hooks (called by PEFT's get/set_peft_model_state_dict) --------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        return find_tuner(model, required=True).tensors_to_save(adapter_name, config, state_dict)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        return key if adapter_file.is_delta_key(key) else super()._remove_adapter_name_from_key(key, adapter_name)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        tuner = find_tuner(model, required=True)
        ours = {k: v for k, v in state_dict.items() if adapter_file.is_delta_key(k)}
        tuner.load_delta_tensors(adapter_name, config, ours)
        return {k: v for k, v in state_dict.items() if k not in ours}

    def tensors_to_save(self, adapter_name: str, config, state_dict: dict) -> dict[str, torch.Tensor]:
        """The file's tensors for `adapter_name`'s delta. PEFT saves `config` right after them: the base fingerprint
        and the counts go on it."""
        delta = self.adapter_delta(adapter_name)
        whole_heads = self.__dict__.get("_whole_heads", {})
        for key, value in state_dict.items():
            # FSDP2: the fully trained copies (modules_to_save) PEFT takes from this state dict next are shards. They
            # were gathered with the state dict when every process took it (the main process may save alone).
            if f".modules_to_save.{adapter_name}." in key and shards.is_shard(value):
                suffix = next((s for s in whole_heads if key == s or key.endswith("." + s)), None)
                state_dict[key] = whole_heads.pop(suffix) if suffix is not None else value.full_tensor()
        config.base_fingerprint = self.base_fingerprint(config)
        config.saved_counts = self.counts(adapter_name)
        return adapter_file.delta_tensors(delta, self.adapter_numels(adapter_name), getattr(torch, config.save_dtype))

    def load_delta_tensors(self, adapter_name: str, config, tensors: dict[str, torch.Tensor]) -> None:
        """The delta `tensors` of a state dict PEFT loads into `adapter_name` become its delta.

        After `load_adapter` validated the file (`note_validated`), the delta parsed then is the one applied, and the
        base and the step count were checked and noted then; a state dict loaded otherwise
        (`set_peft_model_state_dict`) is checked against this base and parsed here."""
        validated = self._validated.get(adapter_name)
        if validated is None:
            self.check_base(config, source=f"the state dict of adapter {adapter_name!r}")
        delta = _validated_delta(tensors, validated)
        if delta is None:
            delta = file_checks.parse_delta(tensors, self.adapter_numels(adapter_name))
        # A load through `load_adapter` noted the file's own counts; the config may be a live one reused for it.
        if validated is None and isinstance(config.saved_counts, dict):
            self.note_loaded(adapter_name, config.saved_counts)
        self.set_adapter_delta(adapter_name, delta)
        self._awaiting.discard(adapter_name)
        self._validated.pop(adapter_name, None)

    # -- what a load notes -------------------------------------------------------------------------------------------
    def note_loaded(self, adapter_name: str, counts: dict) -> None:
        """Remember how many optimizer steps a loaded adapter had taken: its draws continue from there."""
        step = counts.get("step", 0) if isinstance(counts, dict) else 0
        self._steps_loaded[adapter_name] = step if isinstance(step, int) and step >= 0 else 0

    def note_validated(self, adapter_name: str, file: adapter_file.AdapterFile) -> None:
        """`load_adapter` validated `file` (`validation.validate`) for `adapter_name`: its step count is noted, and the
        state dict PEFT then loads from it takes the delta parsed by the validation (`load_delta_tensors`)."""
        self.note_loaded(adapter_name, file.counts)
        self._validated[adapter_name] = file

    def load_notes(self, adapter_name: str) -> tuple[int | None, adapter_file.AdapterFile | None]:
        """What is noted of `adapter_name` for loading now (its step count, the file validated for it), for a failed
        load to put back (`restore_load_notes`)."""
        return self._steps_loaded.get(adapter_name), self._validated.get(adapter_name)

    def restore_load_notes(self, adapter_name: str, notes: tuple) -> None:
        """Put back what `load_notes` returned."""
        step, validated = notes
        for table, value in ((self._steps_loaded, step), (self._validated, validated)):
            if value is None:
                table.pop(adapter_name, None)
            else:
                table[adapter_name] = value


def _validated_delta(tensors: dict[str, torch.Tensor], file: adapter_file.AdapterFile | None) -> SparseDelta | None:
    """The delta parsed when `file` was validated, if `tensors` are that file's delta tensors (PEFT reads the file
    again to load it), on the devices PEFT read them to; None otherwise."""
    if file is None or file.parsed is None:
        return None
    if set(tensors) != {key for key in file.tensors if adapter_file.is_delta_key(key)}:
        return None
    on_devices = {}
    for name, (index, values) in file.parsed.tensors.items():
        stem = adapter_file.MODEL_PREFIX + name
        index_device = tensors[stem + adapter_file.INDEX_SUFFIX].device
        on_devices[name] = (index.to(index_device), values.to(tensors[stem + adapter_file.VALUES_SUFFIX].device))
    return SparseDelta(on_devices)

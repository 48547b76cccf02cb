"""`StocTuningModel`: the PEFT tuner for Stochastic Tuning.

The base model trains in place: no layers are wrapped and a forward costs what the plain model's does. The tuner
decides which parameters are candidates, keeps every adapter as a sparse delta, applies exactly one of them (or a
merged set) to the base, and runs a `StepEngine` while the active adapter is trainable.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings
from dataclasses import dataclass

import torch
from peft.config import PeftConfig
from peft.tuners.tuners_utils import BaseTuner
from peft.utils.other import AuxiliaryTrainingWrapper, set_additional_trainable_modules
from torch import nn

from ..adapter_files.adapter_io import AdapterFiles
from ..distributed import shards
from ..integration.trainer_hooks import register_trainer_callback
from ..quantized import bnb_weights as quantized
from ..quantized.overlay import Overlay
from ..training.engine import StepEngine
from .candidates import (
    Candidate,
    LeftOut,
    describe_left_out,
    find_candidates,
    refuse_unsupported_quantization,
    resolve_count,
)
from .delta import SparseDelta
from .layer import AdapterSlot, StocTuningLayer
from .merging import Merging
from .training_api import TrainingAPI
from .weight_guard import WeightGuard

# Set while a copy is made only to be pickled: it starts no step engine (its hooks could not be pickled).
_DETACHED: contextvars.ContextVar[bool] = contextvars.ContextVar("peft_stoc_detached", default=False)


@contextlib.contextmanager
def detached_copies():
    """Copies of StocTuning models made inside start no step engine."""
    token = _DETACHED.set(True)
    try:
        yield
    finally:
        _DETACHED.reset(token)


@dataclass
class AdapterRecord:
    """What the tuner keeps of one adapter beside its saved state (`layer.AdapterSlot`)."""

    candidates: list[Candidate]
    k: int  # entries drawn per step
    max_changed: int | None  # budget of distinct changed entries
    trainable: bool
    engine: StepEngine | None = None  # made the first time the adapter trains; kept while it pauses
    captured_at: int = 0  # the engine's step at which the adapter's delta was last stored


class StocTuningModel(AdapterFiles, Merging, TrainingAPI, BaseTuner):
    """Stochastic Tuning of a transformers model (Akbar-Tajari & Pilehvar).

    Created by `peft.get_peft_model(model, StocTuningConfig(...))`; not meant to be built directly.

    Args:
        model (`torch.nn.Module`): the base model; it trains in place, no module is replaced.
        config (`StocTuningConfig` or `dict[str, StocTuningConfig]`): the adapter's configuration.
        adapter_name (`str`): name of the adapter, `"default"` by default.

    Example:

        ```py
        >>> import torch
        >>> from peft import get_peft_model
        >>> from peft_stoc import StocTuningConfig

        >>> model = get_peft_model(base, StocTuningConfig(k=0.0008, task_type="CAUSAL_LM"))
        >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)  # any torch optimizer, as for full training
        >>> model(**batch).loss.backward()
        >>> optimizer.step()  # k entries drawn and updated
        >>> model.stoc_stats()  # step, drawn, changed, density, memory held, adapter bytes
        ```

    Attributes:
        model (`torch.nn.Module`): the base model, whose `stoc_tuning` child holds every adapter's state.
        peft_config (`dict[str, StocTuningConfig]`): the adapters' configurations.
    """

    prefix: str = "stoc_"
    tuner_layer_cls = StocTuningLayer
    target_module_mapping: dict[str, list[str]] = {}

    # -- injection ---------------------------------------------------------------------------------------------
    @property
    def stoc_layer(self) -> StocTuningLayer:
        """The adapters' state, kept in the model itself (`model.stoc_tuning`); see `StocTuningLayer`."""
        return self.__dict__["_stoc_layer"]

    def _pre_injection_hook(self, model: nn.Module, config: PeftConfig, adapter_name: str) -> None:
        register_trainer_callback()  # transformers' trainer may have finished importing only now
        if "_stoc_layer" not in self.__dict__:
            layer = StocTuningLayer()
            model.add_module(StocTuningLayer.ATTRIBUTE, layer)
            # Referenced, not registered: registered here too, its state would appear twice in state_dict().
            self.__dict__["_stoc_layer"] = layer
            object.__setattr__(layer, "tuner", self)  # how hooks on the model find their way back
            layer.patch.after_load = self._after_state_loaded
            layer.patch.whole = layer.whole_patch
            self._awaiting: set[str] = set()  # adapters configured from a saved file whose deltas were not loaded
            self._validated: set[str] = set()  # adapters whose file was checked against the base before loading
            self._cpu_layouts = quantized.hold_canonical(model)
            self._delta_guard = model.register_forward_pre_hook(self._refuse_missing_delta)
            self._weight_guard = WeightGuard(self._trained_view, self._shown_text)
            self._base_load_hooks = (
                model.register_load_state_dict_pre_hook(self._before_base_load),
                model.register_load_state_dict_post_hook(self._after_base_load),
            )
            self._loading_base = False
            self._adapters: dict[str, AdapterRecord] = {}
            self._steps_loaded: dict[str, int] = {}  # optimizer steps an adapter loaded from a file had taken
            self._stale: set[str] = set()  # adapters whose weights changed without a capture (a state dict load)
            self._requires_grad_before = {id(p): (p, p.requires_grad) for p in model.parameters()}
            # Where each parameter lives, to follow FSDP2 when it replaces the parameters with shards.
            self._homes = {id(p): (m, n) for m in model.modules() for n, p in m._parameters.items() if p is not None}
            self._fingerprints: dict[tuple, dict] = {}  # under FSDP2, fingerprints gathered once (see `_fingerprint`)

    def __setstate__(self, state) -> None:
        """A copy (`copy.deepcopy(peft_model)`: a reference model, a snapshot) trains on its own, from the same
        adapters and step counts, and nothing of it reaches back into the model it was copied from. (A `__deepcopy__`
        here would also answer for the PEFT model, which hands unknown attributes to its tuner.)"""
        super().__setstate__(state)
        self._after_copy()

    def _after_copy(self) -> None:
        """The copied step engines hold copies of this model's hooks and gradients, bound to the original's
        optimizer: the copy stores what its weights hold, retires them and starts its own when it trains."""
        self.__dict__.pop("_state_before", None)  # the record of the original's modules before its first load
        quantized.own_weights(self.model)
        self._requires_grad_before = {id(p): (p, flag) for p, flag in self._requires_grad_before.values()}
        self._homes = {
            id(module._parameters[name]): (module, name)
            for module, name in self._homes.values()
            if module._parameters.get(name) is not None
        }
        self._store_and_forget_engines()
        for record in self._adapters.values():
            record.captured_at = 0
        if not _DETACHED.get():
            self._apply_adapter_state()

    def _create_and_replace(self, *args, **kwargs) -> None:
        raise NotImplementedError("StocTuning trains the base in place and replaces no module.")

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        # Only modules_to_save wrappers are replaced on unload, by a complete module (the trained copy or the
        # original). PEFT's default copies `.weight` over, which heads without one (RobertaClassificationHead) lack.
        setattr(parent, child_name, new_module)

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self._pre_injection_hook(model, self.peft_config[adapter_name], adapter_name)
        config = self.peft_config[adapter_name]
        refuse_unsupported_quantization(model)
        left_out: list[LeftOut] = []
        candidates = find_candidates(model, config, left_out, overlay_for=self._overlay_for)
        if config.memory == "dense" and any(c.overlay is not None for c in candidates):
            raise ValueError(
                "StocTuningConfig(memory='dense') keeps a dense gradient of every candidate, which a quantized base's "
                "weights do not have: their gradients are drawn from as the backward computes them. Use the default "
                "memory='auto' (or 'lean') with torch.optim SGD, Adam or AdamW."
            )
        if left_out:
            drawn_from = sum(c.numel for c in candidates)
            share = sum(item.entries for item in left_out) / (drawn_from + sum(item.entries for item in left_out))
            warnings.warn(
                f"StocTuning leaves {len(left_out)} weights of the matched modules out of the candidates "
                f"({share:.1%} of their entries): {describe_left_out(left_out)}. They stay as they are and are not "
                f"tuned; the draw runs over the other {len(candidates)} tensors ({drawn_from:,} entries). To tune "
                "every weight, load the base in a float dtype (e.g. torch_dtype=torch.bfloat16) or quantized with "
                "bitsandbytes.",
                stacklevel=2,
            )
        k = resolve_count(config.k, candidates, "k")
        max_changed = None if config.max_changed is None else resolve_count(config.max_changed, candidates, "max")
        if max_changed is not None and max_changed < k:
            raise ValueError(
                f"max_changed={config.max_changed!r} resolves to {max_changed} entries, fewer than the {k} drawn "
                "per step; raise max_changed or lower k."
            )
        self._adapters[adapter_name] = AdapterRecord(candidates, k, max_changed, trainable=not config.inference_mode)
        if (config.saved_counts or {}).get("changed"):
            self._awaiting.add(adapter_name)
        if not config.inference_mode and not self._trainable_candidates(adapter_name):
            del self._adapters[adapter_name]
            raise ValueError(
                "Every candidate parameter was frozen (requires_grad=False) before wrapping, so there is nothing to "
                "train. Unfreeze the parameters StocTuning should draw from, or pick them with `target_modules`."
            )
        slot = AdapterSlot(self._delta_shared_with(adapter_name))
        slot.refresh = functools.partial(self._refresh, adapter_name)  # (a copy of the model rebinds it)
        self.stoc_layer.stoc_adapters[adapter_name] = slot
        if slot.delta.tensors:
            self._awaiting.discard(adapter_name)
        owners = {name.rpartition(".")[0] for name in (c.name for c in candidates)}
        self.targeted_module_names.extend(sorted(owners - set(self.targeted_module_names)))
        set_additional_trainable_modules(
            model=model,
            peft_config=config,
            model_config=BaseTuner.get_model_config(self),
            adapter_name=adapter_name,
            activate_adapter=adapter_name in self.active_adapters,
        )
        self._apply_adapter_state()

    def _overlay_for(self, name: str, module: nn.Module) -> Overlay:
        """The overlay of the quantized weight `name` (owned by `module`), shared by every adapter."""
        overlays = self.stoc_layer.overlays
        key = name.replace(".", "-")  # (module names cannot hold dots)
        if key not in overlays:
            quantized.refuse_without_compute_dtype(module, name)
            overlays[key] = Overlay(module, name).attach()
        return overlays[key]

    def _delta_shared_with(self, adapter_name: str) -> SparseDelta | None:
        """An adapter added with the very config object of an existing adapter starts as a copy of that adapter.

        A LoRA adapter so added is a fresh one whose parameters the caller copies (TRL's DPO builds its reference
        adapter from the policy's config and copies every parameter named `.default.`); a StocTuning adapter's
        state is a sparse delta, not parameters, so the copy is made here. Its own training history starts
        afresh."""
        config = self.peft_config[adapter_name]
        for name, other in self.peft_config.items():
            if other is config and name != adapter_name and name in self.stoc_layer.stoc_adapters:
                return self.adapter_delta(name).clone()
        return None

    # -- state -------------------------------------------------------------------------------------------------
    def _base_params(self) -> dict[str, nn.Parameter]:
        self._follow_shards()
        return {c.name: c.param for candidates in (r.candidates for r in self._adapters.values()) for c in candidates}

    def _engine_of(self, name: str) -> StepEngine | None:
        record = self._adapters.get(name)
        return record.engine if record is not None else None

    def _running_or_paused(self) -> list[StepEngine]:
        """The step engines of all adapters (of those that trained)."""
        return [r.engine for r in self._adapters.values() if r.engine is not None]

    def _forget_engines(self) -> None:
        """Retire every step engine (the adapters' state was replaced, or the tuner is going away)."""
        for engine in self._running_or_paused():
            engine.retire()
        for record in self._adapters.values():
            record.engine = None

    def _store_and_forget_engines(self) -> None:
        """Store what the applied adapters' weights hold and each engine's step count, then retire the engines: the
        next ones continue from there."""
        for name in self.stoc_layer.applied:
            self._capture(name)
        for name, record in self._adapters.items():
            if record.engine is not None:
                self._steps_loaded[name] = record.engine.stats.step
        self._forget_engines()

    def _follow_shards(self) -> None:
        """FSDP2's `fully_shard` (applied after `get_peft_model`) replaced the parameters with dim-0 shards: every
        adapter follows the shards, and the record of originals keeps the entries of the rows held here (other
        processes keep theirs). Nothing keeps the whole parameters alive afterwards."""
        candidates = [c for cs in (r.candidates for r in self._adapters.values()) for c in cs]
        attribute = {id(c.param): c.name.rpartition(".")[2] for c in candidates}
        placed = (c for c in candidates if c.uses and c.overlay is None)  # (a quantized weight's handle is the tuner's)
        if all(c.uses[0].module._parameters.get(attribute[id(c.param)]) is c.param for c in placed):
            return
        replaced = shards.sharded_replacements(candidates)
        if not replaced:
            return
        for candidate in candidates:
            candidate.param = replaced.get(id(candidate.param), candidate.param)
        managed = shards.fsdp2_shards()
        now = {
            key: managed[(id(module), name)]
            for key, (module, name) in self._homes.items()
            if (id(module), name) in managed
        }
        following = {}
        for key, (param, requires_grad) in self._requires_grad_before.items():
            param = now.get(key, param)
            following[id(param)] = (param, requires_grad)
        self._requires_grad_before = following
        self._homes = {(id(now[key]) if key in now else key): home for key, home in self._homes.items()}
        layer = self.stoc_layer
        layer.show_adapters()
        layer.patch.hold_only({c.name: c.param for c in candidates})
        self._fingerprints.clear()
        for engine in self._running_or_paused():
            engine.parameters_replaced()
            engine.accept_weights(base_too=True)
        self._weight_guard.watch(c.param for c in candidates if c.param.requires_grad)  # the shards now

    def _adapters_to_apply(self) -> tuple[str, ...]:
        """The adapters whose deltas should be in the weights: the merged ones, else the active one."""
        merged = tuple(self.stoc_layer.merged_adapters)
        return merged or tuple(a for a in self.active_adapters if a in self.stoc_layer.stoc_adapters)

    def _training_adapter(self) -> str | None:
        active = [a for a in self.active_adapters if a in self.stoc_layer.stoc_adapters]
        layer = self.stoc_layer
        if (
            len(active) != 1
            or layer.disable_adapters
            or not (active[0] in self._adapters and self._adapters[active[0]].trainable)
        ):
            return None
        if layer.merged_adapters and tuple(layer.merged_adapters) != (active[0],):
            return None
        return active[0]

    def _trained_view(self) -> tuple | None:
        """What the weights show while an adapter trains — the adapters applied and their deltas' versions — or
        None (no adapter trains, or the base is shown)."""
        layer = self.stoc_layer
        if self._training_adapter() is None or layer.shown != self._adapters_to_apply():
            return None
        return tuple((name, layer.stoc_adapters[name].version) for name in layer.shown)

    def _shown_text(self) -> str:
        shown = self.stoc_layer.shown
        return f"adapter(s) {list(shown)}" if shown else "the base model"

    def _capture(self, name: str) -> None:
        """Store what adapter `name` learned in place as its delta, if it trained since the last capture."""
        engine, layer = self._engine_of(name), self.stoc_layer
        if layer.applied != (name,) or (engine is None and name not in self._stale):
            return  # without training (or a state dict load), the weights hold exactly the stored delta
        step = engine.stats.step if engine is not None else self._steps_loaded.get(name, 0)
        if step == self._adapters[name].captured_at and name not in self._stale:
            return
        layer.capture(name, self._base_params(), engine.masters() if engine is not None else None)
        self._adapters[name].captured_at = step
        self._stale.discard(name)

    def _remove_layer(self) -> None:
        """The model goes back to the caller without StocTuning's state in its tree."""
        for overlay in self.stoc_layer.overlays.values():
            overlay.remove()
        quantized.release_canonical(self._cpu_layouts)
        if isinstance(self.model._modules.get(StocTuningLayer.ATTRIBUTE), StocTuningLayer):
            del self.model._modules[StocTuningLayer.ATTRIBUTE]
        self._delta_guard.remove()
        self._weight_guard.remove()
        for handle in self._base_load_hooks:
            handle.remove()

    def _refuse_missing_delta(self, module, args) -> None:
        """transformers' `from_pretrained(adapter_dir)` and `load_adapter` load only tensors the model already has:
        a StocTuning adapter's sparse deltas are left out. Refuse to compute with such a model instead of giving
        the base's outputs under the adapter's name."""
        if not self._awaiting:  # the usual case, and the only check torch.compile traces
            return
        missing = [name for name in self._awaiting if name in self._adapters_to_apply()]
        if missing and getattr(self.model, "_hf_peft_config_loaded", False):
            counts = self.peft_config[missing[0]].saved_counts or {}
            raise RuntimeError(
                f"StocTuning adapter {missing[0]!r} was loaded through transformers' PEFT integration "
                "(`from_pretrained(adapter_dir)` or `model.load_adapter`), which loads only tensors the model already "
                f"has: its {counts.get('changed', 'sparse')} changed entries were left out, so the outputs would be "
                "the base model's. Load it with `peft.PeftModel.from_pretrained(model, path)` or "
                "`peft.AutoPeftModelFor...from_pretrained(path)` instead."
            )

    def _refresh(self, name: str) -> int:
        """Before the adapters' state is saved: store what `name` learned in place; its step count."""
        self._capture(name)
        return self._step_of(name)

    def gather_for_save(self) -> None:
        """FSDP2: collect the applied adapters' deltas and the base fingerprints from every process now (state dicts
        are taken on every process), so that a save the main process then makes alone (Trainer under FSDP) needs no
        collective."""
        if shards.shard_group(self._base_params().values()) is None:
            return
        for name in self.stoc_layer.applied:
            self._capture(name)
        for config in self.peft_config.values():
            self._fingerprint(config)
        self._whole_heads = {}  # the fully trained copies (modules_to_save), gathered whole
        for module_name, module in self.model.named_modules():
            if isinstance(module, AuxiliaryTrainingWrapper) and hasattr(module, "modules_to_save"):
                for adapter, trained in module.modules_to_save.items():
                    for name, param in trained.named_parameters():
                        whole = param.full_tensor() if shards.is_shard(param) else param.detach().clone()
                        self._whole_heads[f"{module_name}.modules_to_save.{adapter}.{name}"] = whole

    def _step_of(self, name: str) -> int:
        engine = self._engine_of(name)
        return engine.stats.step if engine is not None else self._steps_loaded.get(name, 0)

    def _after_state_loaded(self) -> None:
        """`load_state_dict` replaced the adapters' state (originals, deltas, steps) along with the weights: what
        the weights hold now is the applied adapters' work, to be captured afresh; training goes on from there."""
        layer = self.stoc_layer
        self._forget_engines()
        layer.patch.hold_only(self._base_params())  # FSDP2: a state dict holds the originals of every process
        self._steps_loaded.update({name: slot.step for name, slot in layer.stoc_adapters.items()})
        for record in self._adapters.values():
            record.captured_at = 0
        self._stale.update(layer.applied)
        self._apply_adapter_state()

    def _before_base_load(self, module, state_dict, prefix, *args) -> None:
        """Base weights loaded while adapters are applied (`get_base_model().load_state_dict(...)`, PEFT's
        `set_base_model_state_dict`) replace the base under the adapters: the applied deltas are stored and the
        base restored before the load writes, and `_after_base_load` applies them again on the loaded base. A state
        dict that carries the adapters' state (a checkpoint of the whole model) is loaded as it is instead."""
        layer = self.stoc_layer
        if any(key.startswith(f"{prefix}{StocTuningLayer.ATTRIBUTE}.") for key in state_dict):
            return
        if not layer.applied or not any(f"{prefix}{name}" in state_dict for name in layer.patch.index):
            return
        if args and args[0].get("assign_to_params_buffers"):  # local_metadata of `load_state_dict(assign=True)`
            raise ValueError(
                "load_state_dict(..., assign=True) would replace the parameters that hold the applied StocTuning "
                "adapter, which could then neither be shown nor removed; nothing was loaded. Load without "
                "`assign=True` (the loaded base keeps the adapter on it), or `unload()` first."
            )
        self._store_and_forget_engines()  # their record of the weights (and float32 masters) described the old base
        layer.restore(self._base_params())
        self._loading_base = True

    def _after_base_load(self, module, incompatible_keys) -> None:
        if self._loading_base:
            self._loading_base = False
            self._apply_adapter_state()

    def _drop_engine(self, name: str) -> None:
        record = self._adapters.get(name)
        engine, record.engine = (record.engine, None) if record is not None else (None, None)
        if engine is not None:
            engine.retire()
        if record is not None:
            record.captured_at = 0

    def _apply_adapter_state(self) -> None:
        """Bring weights, trainability and the step engine in line with the active/enabled/merged state."""
        layer, params = self.stoc_layer, self._base_params()
        training = self._training_adapter()
        for name, engine in ((n, r.engine) for n, r in self._adapters.items() if r.engine is not None):
            if name != training and engine.running:
                engine.stop()  # kept: its stats and random stream go on when the adapter trains again
        wanted = self._adapters_to_apply()
        if wanted != layer.applied:
            for name in layer.applied:
                self._capture(name)
            if wanted:
                layer.apply(wanted, params)
            else:
                layer.restore(params)
            # autocast keeps the low-precision copies it made of trainable weights for its whole region, whatever
            # was written into them since: forwards after the switch must cast the weights as they are now.
            torch.clear_autocast_cache()
        if layer.disable_adapters:
            layer.show_base(params)
        else:
            layer.show_adapters()
        layer.set_active(self.active_adapters, enabled=not layer.disable_adapters)
        self._set_requires_grad(training)
        if training is not None:
            engine = self._engine_of(training)
            if engine is None:
                record = self._adapters[training]
                engine = StepEngine(
                    self.model,
                    self._trainable_candidates(training),
                    self.peft_config[training],
                    layer.patch,
                    record.k,
                    record.max_changed,
                    state_key=f"peft_stoc.{training}",
                    step=self._steps_loaded.get(training, 0),
                )
                record.engine = engine
                record.captured_at = engine.stats.step
                engine.driven_by_trainer = getattr(self, "_driven_by_trainer", False)
                engine.on_shard = self._follow_shards
                engine.on_graph = self._weight_guard.note
                if engine.sparse is not None:
                    engine.sparse.check = self._weight_guard.check
            if not engine.running:
                engine.start()
            engine.accept_weights()

    def _trainable_candidates(self, name: str) -> list[Candidate]:
        """The candidates training may change: parameters the user froze before wrapping stay frozen. A model whose
        every parameter was frozen (`prepare_model_for_kbit_training` freezes them all, as LoRA needs) chose none."""
        frozen = {key for key, (_, requires_grad) in self._requires_grad_before.items() if not requires_grad}
        if len(frozen) == len(self._requires_grad_before):
            frozen = set()
        return [c for c in self._adapters[name].candidates if id(c.param) not in frozen]

    def _set_requires_grad(self, training: str | None) -> None:
        layer = self.stoc_layer
        sharded = any(shards.is_shard(p) for p in self._base_params().values())
        if training is None and layer.disable_adapters and sharded:
            # FSDP2 hands a shard its reduced gradient, and calls its hooks, only while it requires one: the shards
            # keep requiring gradients while the base is shown, so the weight guard sees (and refuses) a backward run
            # inside `disable_adapter()` instead of FSDP2 dropping its gradients in silence.
            active = [a for a in self.active_adapters if a in self._adapters and self._adapters[a].trainable]
            training = active[0] if len(active) == 1 else None
        trainable = {id(c.param) for c in self._trainable_candidates(training)} if training else set()
        aux = {id(p) for m in self.model.modules() if isinstance(m, AuxiliaryTrainingWrapper) for p in m.parameters()}
        for param in self.model.parameters():
            if id(param) not in aux:
                param.requires_grad_(id(param) in trainable)
        # Watched once they can receive gradients (a frozen tensor takes no hook).
        self._weight_guard.watch(p for p in self.model.parameters() if id(p) in trainable)

    def adapter_delta(self, adapter_name: str) -> SparseDelta:
        """The delta of `adapter_name` right now (for the adapter being trained: what changed so far)."""
        if adapter_name not in self.stoc_layer.stoc_adapters:
            known = list(self.stoc_layer.stoc_adapters)
            raise ValueError(f"Adapter {adapter_name!r} does not exist; adapters: {known}.")
        self._capture(adapter_name)
        return self.stoc_layer.stoc_adapters[adapter_name].delta

    def set_adapter_delta(self, adapter_name: str, delta: SparseDelta) -> None:
        """Replace `adapter_name`'s delta (loading) and show it if the adapter is applied."""
        layer = self.stoc_layer
        if adapter_name in layer.applied:
            layer.restore(self._base_params())  # its old values must not be mistaken for the base
        layer.stoc_adapters[adapter_name].delta = delta
        layer.stoc_adapters[adapter_name].version += 1  # a graph built on the old delta must not run its backward
        self._drop_engine(adapter_name)  # a loaded delta starts a fresh training history
        self._apply_adapter_state()

    # -- PEFT API ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _enable_peft_forward_hooks(self, *args, **kwargs):
        # PeftModel's per-sample `adapter_names` (mixed-adapter batches): one set of base weights serves the batch.
        if kwargs.get("adapter_names") is not None:
            raise ValueError(
                "StocTuning changes the base weights themselves, so one adapter serves a whole batch: "
                "`adapter_names` (several adapters in one batch) is not supported. Run one batch per adapter, "
                "switching with `set_adapter`."
            )
        yield

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        super()._enable_adapter_layers(enabled)  # modules_to_save wrappers
        self.stoc_layer._disable_adapters = not enabled
        self._apply_adapter_state()

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        if len(names) != 1:
            raise ValueError(
                "StocTuning activates one adapter at a time. To use several together, combine them with "
                "`add_weighted_adapter` or apply them with `merge_adapter(adapter_names=[...])`."
            )
        if names[0] not in self.stoc_layer.stoc_adapters:
            raise ValueError(f"Adapter {names[0]!r} not found; adapters: {list(self.stoc_layer.stoc_adapters)}")
        if self.stoc_layer.merged_adapters:
            warnings.warn("Adapter cannot be set when the model is merged. Unmerging the model first.", stacklevel=2)
            self.stoc_layer.merged_adapters = []
        self._switching = True  # PEFT calls the layer's `set_adapter`, which otherwise comes back here
        try:
            super().set_adapter(names[0], inference_mode=inference_mode)  # modules_to_save wrappers
        finally:
            self._switching = False
        self._adapters[names[0]].trainable = not inference_mode
        self._apply_adapter_state()

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        super().set_requires_grad(names, requires_grad=requires_grad)
        for name in names:
            self._adapters[name].trainable = requires_grad
        self._apply_adapter_state()

    def delete_adapter(self, adapter_name: str) -> None:
        layer = self.stoc_layer
        if adapter_name not in layer.stoc_adapters:
            raise ValueError(f"Adapter {adapter_name} does not exist")
        if adapter_name in layer.merged_adapters:
            raise ValueError(
                f"Cannot delete adapter(s) ['{adapter_name}'] while they are merged. Please unmerge them first."
            )
        self._drop_engine(adapter_name)
        if adapter_name in layer.applied:
            layer.restore(self._base_params())
        del layer.stoc_adapters[adapter_name]
        del self.peft_config[adapter_name]
        self._adapters.pop(adapter_name, None)
        remaining = list(layer.stoc_adapters)
        if adapter_name in self.active_adapters:
            self.active_adapter = remaining[:1]
            if remaining:
                warnings.warn(
                    f"Adapter {adapter_name} was active which is now deleted. Setting active adapter to "
                    f"{remaining[0]}.",
                    stacklevel=2,
                )
        for module in self.model.modules():
            if isinstance(module, AuxiliaryTrainingWrapper):
                module.delete_adapter(adapter_name, new_active_adapters=self.active_adapters or None)
        self._apply_adapter_state()

"""The adapters' state in the weights (a part of `model.StocTuningModel`): which adapters the weights show, which
one trains and its step engine, and storing what training changed as the adapter's delta.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from ..distributed import shards
from ..training.engine import StepEngine
from .candidates import Candidate
from .delta import SparseDelta


@dataclass
class AdapterRecord:
    """What the tuner keeps of one adapter beside its saved state (`layer.AdapterSlot`)."""

    candidates: list[Candidate]
    k: int  # entries drawn per step
    max_changed: int | None  # budget of distinct changed entries
    trainable: bool
    engine: StepEngine | None = None  # made the first time the adapter trains; kept while it pauses
    captured_at: int = 0  # the engine's step at which the adapter's delta was last stored


class AdapterState:
    """Weights, trainability and step engines of `StocTuningModel`, kept in line with its adapters' state."""

    # -- step engines and captures ----------------------------------------------------------------------------
    def base_params(self) -> dict[str, nn.Parameter]:
        """Every adapter's candidate parameters by name (following FSDP2's shards once it replaced them)."""
        self._follow_shards()
        return {c.name: c.param for candidates in (r.candidates for r in self._adapters.values()) for c in candidates}

    def _engine_of(self, name: str) -> StepEngine | None:
        record = self._adapters.get(name)
        return record.engine if record is not None else None

    def step_engines(self) -> list[StepEngine]:
        """The step engines of all adapters (of those that trained)."""
        return [r.engine for r in self._adapters.values() if r.engine is not None]

    def _forget_engines(self) -> None:
        """Retire every step engine (the adapters' state was replaced, or the tuner is going away)."""
        for engine in self.step_engines():
            engine.retire()
        for record in self._adapters.values():
            record.engine = None

    def _store_and_forget_engines(self) -> None:
        """Store what the applied adapters' weights hold and each engine's step count, then retire the engines: the
        next ones continue from there."""
        for name in self.stoc_state.applied:
            self._capture(name)
        for name, record in self._adapters.items():
            if record.engine is not None:
                self._steps_loaded[name] = record.engine.stats.step
        self._forget_engines()

    def _drop_engine(self, name: str) -> None:
        record = self._adapters.get(name)
        engine, record.engine = (record.engine, None) if record is not None else (None, None)
        if engine is not None:
            engine.retire()
        if record is not None:
            record.captured_at = 0

    def _capture(self, name: str) -> None:
        """Store what adapter `name` learned in place as its delta, if it trained since the last capture."""
        engine, layer = self._engine_of(name), self.stoc_state
        if layer.applied != (name,) or (engine is None and name not in self._stale):
            return  # without training (or a state dict load), the weights hold exactly the stored delta
        step = engine.stats.step if engine is not None else self._steps_loaded.get(name, 0)
        if step == self._adapters[name].captured_at and name not in self._stale:
            return
        layer.capture(name, self.base_params(), engine.masters() if engine is not None else None)
        self._adapters[name].captured_at = step
        self._stale.discard(name)

    def _refresh(self, name: str) -> int:
        """Before the adapters' state is saved: store what `name` learned in place; its step count."""
        self._capture(name)
        return self._step_of(name)

    def _step_of(self, name: str) -> int:
        engine = self._engine_of(name)
        return engine.stats.step if engine is not None else self._steps_loaded.get(name, 0)

    # -- what the weights show, and who trains ---------------------------------------------------------------
    def _adapters_to_apply(self) -> tuple[str, ...]:
        """The adapters whose deltas should be in the weights: the merged ones, else the active one."""
        merged = tuple(self.stoc_state.merged_adapters)
        return merged or tuple(a for a in self.active_adapters if a in self.stoc_state.stoc_adapters)

    def _training_adapter(self) -> str | None:
        active = [a for a in self.active_adapters if a in self.stoc_state.stoc_adapters]
        layer = self.stoc_state
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
        layer = self.stoc_state
        if self._training_adapter() is None or layer.shown != self._adapters_to_apply():
            return None
        return tuple((name, layer.stoc_adapters[name].version) for name in layer.shown)

    def _shown_text(self) -> str:
        shown = self.stoc_state.shown
        return f"adapter(s) {list(shown)}" if shown else "the base model"

    def _apply_adapter_state(self) -> None:
        """Bring weights, trainability and the step engine in line with the active/enabled/merged state."""
        layer, params = self.stoc_state, self.base_params()
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
                engine = self._new_engine(training)
            if not engine.running:
                engine.start()
            engine.accept_weights()

    def _new_engine(self, name: str) -> StepEngine:
        """The step engine of adapter `name`, made the first time it trains: it continues from the step count the
        adapter was loaded with."""
        record = self._adapters[name]
        engine = StepEngine(
            self.model,
            self._trainable_candidates(name),
            self.peft_config[name],
            self.stoc_state.patch,
            record.k,
            record.max_changed,
            state_key=f"peft_stoc.{name}",
            step=self._steps_loaded.get(name, 0),
        )
        record.engine = engine
        record.captured_at = engine.stats.step
        engine.progress.driven_by_trainer = getattr(self, "_driven_by_trainer", False)
        engine.on_shard = self._follow_shards
        engine.on_graph = self._weight_guard.note
        if engine.sparse is not None:
            engine.sparse.check = self._weight_guard.check
        return engine

    def _trainable_candidates(self, name: str) -> list[Candidate]:
        """The candidates training may change: parameters the user froze before wrapping stay frozen. A model whose
        every parameter was frozen (`prepare_model_for_kbit_training` freezes them all, as LoRA needs) chose none."""
        frozen = {key for key, (_, requires_grad) in self._requires_grad_before.items() if not requires_grad}
        if len(frozen) == len(self._requires_grad_before):
            frozen = set()
        return [c for c in self._adapters[name].candidates if id(c.param) not in frozen]

    def _set_requires_grad(self, training: str | None) -> None:
        layer = self.stoc_state
        sharded = any(shards.is_shard(p) for p in self.base_params().values())
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

    # -- deltas -------------------------------------------------------------------------------------------------
    def adapter_delta(self, adapter_name: str) -> SparseDelta:
        """The delta of `adapter_name` right now (for the adapter being trained: what changed so far)."""
        if adapter_name not in self.stoc_state.stoc_adapters:
            known = list(self.stoc_state.stoc_adapters)
            raise ValueError(f"Adapter {adapter_name!r} does not exist; adapters: {known}.")
        self._capture(adapter_name)
        return self.stoc_state.stoc_adapters[adapter_name].delta

    def set_adapter_delta(self, adapter_name: str, delta: SparseDelta) -> None:
        """Replace `adapter_name`'s delta (loading) and show it if the adapter is applied."""
        layer = self.stoc_state
        if adapter_name in layer.applied:
            layer.restore(self.base_params())  # its old values must not be mistaken for the base
        layer.stoc_adapters[adapter_name].delta = delta
        layer.stoc_adapters[adapter_name].version += 1  # a graph built on the old delta must not run its backward
        self._drop_engine(adapter_name)  # a loaded delta starts a fresh training history
        self._apply_adapter_state()

"""What a training loop, Trainer or user asks of a StocTuning tuner beside PEFT's API (a part of
`model.StocTuningModel`): per-adapter statistics, the step engine of the adapter in training, gradient accumulation
in a plain loop, and accepting weights changed on purpose.
"""

from __future__ import annotations

import contextlib

import torch
from peft.utils.other import ModulesToSaveWrapper

from ..training.engine import StepEngine


class TrainingAPI:
    """`stoc_stats`, `stoc_parameter_counts`, `stoc_engine`, `stoc_accumulating`, `stoc_sync` of `StocTuningModel`."""

    def stoc_stats(self, adapter_name: str | None = None) -> dict[str, float]:
        """Figures of an adapter (default: the one being trained): optimizer steps, entries drawn at the last step,
        distinct entries changed so far, density (changed / candidate entries), and the adapter file's payload in
        bytes (indices and values of the changed entries plus the modules_to_save weights)."""
        name = adapter_name or self._training_adapter() or self.active_adapters[0]
        if name not in self.stoc_state.stoc_adapters:
            raise ValueError(f"Adapter {name!r} does not exist; adapters: {list(self.stoc_state.stoc_adapters)}.")
        engine = self._engine_of(name)
        if engine is not None:
            # The record of originals is shared by the adapters: it counts this one's changes while it trains.
            if not engine.running:
                engine.stats.changed = self.adapter_delta(name).num_changed
            elif not engine.sharded:  # (under FSDP2 each process holds a part: the step counted them all)
                engine.stats.changed = engine.patch.count
            stats = engine.stats.as_dict()
        else:
            candidates = sum(c.numel for c in self._adapters[name].candidates)
            changed = self.adapter_delta(name).num_changed
            stats = {
                "step": self._steps_loaded.get(name, 0),
                "drawn": 0,
                "changed": changed,
                "density": changed / candidates,
                "grad_bytes": 0,
                "optimizer_state_bytes": 0,
            }
        value_bytes = torch.finfo(getattr(torch, self.peft_config[name].save_dtype)).bits // 8
        head_bytes = sum(p.numel() * p.element_size() for p in self._head_parameters(name))
        stats["adapter_bytes"] = stats["changed"] * (4 + value_bytes) + head_bytes
        return stats

    def stoc_parameter_counts(self, adapter_name: str | None = None) -> dict[str, int]:
        """What one optimizer step trains: `k` entries drawn from `candidates` base entries, plus the `head`
        parameters of modules_to_save, trained in full."""
        name = adapter_name or self._training_adapter() or self.active_adapters[0]
        head = sum(p.numel() for p in self._head_parameters(name))
        return {
            "k": self._adapters[name].k,
            "candidates": sum(c.numel for c in self._adapters[name].candidates),
            "head": head,
        }

    def stoc_nb_trainable_parameters(self, adapter_name: str | None = None) -> tuple[int, int]:
        """PEFT's `(trainable, all)` pair as StocTuning counts it: the parameters one optimizer step trains (k drawn
        entries plus the modules_to_save), and every parameter of the model. `print_trainable_parameters()` prints
        the same pair, with the candidates the k entries are drawn from."""
        counts = self.stoc_parameter_counts(adapter_name)
        return counts["k"] + counts["head"], sum(p.numel() for p in self.model.parameters())

    def stoc_engine(self) -> StepEngine | None:
        """The step engine of the adapter being trained, if any."""
        engine = self._engine_of(self._training_adapter() or "")
        return engine if engine is not None and engine.running else None

    @contextlib.contextmanager
    def stoc_accumulating(self):
        """Keep candidate gradients dense during the backwards inside: the micro-batches that are not the last of an
        optimizer step, in a plain loop that accumulates gradients (Trainer, TRL, accelerate's `accumulate()` and DDP
        are detected without it)."""
        engine = self.stoc_engine()
        if engine is None:
            yield
            return
        engine.progress.hold_gradients = True
        try:
            yield
        finally:
            engine.progress.hold_gradients = False

    def set_driven_by_trainer(self, driven: bool) -> None:
        """Called by `StocTuningCallback` when a Trainer starts and ends training this model."""
        self._driven_by_trainer = driven
        for engine in self.step_engines():
            engine.progress.driven_by_trainer = driven

    def stoc_sync(self) -> None:
        """Accept changes made to the base weights outside an optimizer step as the new starting point (for every
        adapter that has trained, paused ones too)."""
        for engine in self.step_engines():
            engine.accept_weights(base_too=True)

    def _head_parameters(self, name: str) -> list[torch.nn.Parameter]:
        """The parameters of adapter `name`'s trained copies of the modules_to_save (trained in full, saved whole)."""
        return [
            p
            for m in self.model.modules()
            if isinstance(m, ModulesToSaveWrapper) and name in m.modules_to_save
            for p in m.modules_to_save[name].parameters()
        ]

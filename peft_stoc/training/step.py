"""`StocTuningStep`: one optimizer step of Stochastic Tuning — draw → confine → the optimizer's step → update.

Nothing in a training loop has to change: torch's optimizer-step hooks (`optimizer_hooks`) build this object for every
step of an optimizer holding the candidates of the adapter being trained, and run its two halves around the
optimizer's own step. A loop that prefers to show the step builds it itself, the way `peft.optimizers` builds LoRA+'s
optimizer::

    step = StocTuningStep(model, optimizer)
    for batch in loader:
        model(**batch).loss.backward()
        step.step()  # draw, confine, optimizer.step(), update
        optimizer.zero_grad()

What each phase does depends on the memory mode, through the engine's strategy (`engine.StepEngine.strategy`):

=========  =====================================================  =================================================
phase      dense (`dense.DenseStrategy`)                          lean (`lean.LeanStrategy`; FSDP2: `ShardedStrategy`)
=========  =====================================================  =================================================
draw       over the dense gradients (`selection.draw`)            finished from the gradients consumed in the backward
confine    originals recorded, gradients masked, decay redirected  the optimizer is handed no candidate gradient
optimizer  updates the candidates from the masked gradients       updates the other parameters only
update     decay given back, untouched entries checked            `sparse_optim` on the drawn entries, originals first
=========  =====================================================  =================================================
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class StepStats:
    """Figures of the latest optimizer step."""

    step: int = 0  # optimizer steps taken with this adapter
    drawn: int = 0  # entries drawn at the latest step
    changed: int = 0  # distinct entries changed so far
    candidates: int = 0  # entries that may be drawn
    grad_bytes: int = 0  # most bytes of candidate gradients held at once during the latest step
    optimizer_state_bytes: int = 0  # optimizer state held for candidates after the latest step

    @property
    def density(self) -> float:
        return self.changed / self.candidates if self.candidates else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "step": self.step,
            "drawn": self.drawn,
            "changed": self.changed,
            "density": self.density,
            "grad_bytes": self.grad_bytes,
            "optimizer_state_bytes": self.optimizer_state_bytes,
        }


class StocTuningStep:
    """The StocTuning step of `optimizer` over `model` (a StocTuning `PeftModel` or its tuner): `step()` runs
    draw → confine → the optimizer's own step → update, for the adapter being trained at that moment."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, engine=None):
        self.model = model
        self.optimizer = optimizer
        self._engine = engine  # given by the optimizer-step hooks; found at each step otherwise

    @property
    def engine(self):
        """The step engine of the adapter being trained."""
        if self._engine is not None:
            return self._engine
        from ..tuner.stoc_state import find_tuner

        engine = find_tuner(self.model, required=True).stoc_engine()
        if engine is None:
            raise RuntimeError(
                "StocTuning: no adapter is being trained, so there is no step to take. Put the model in training "
                "mode with a trainable adapter active and enabled (e.g. `model.train()`, `set_adapter(name)`)."
            )
        return engine

    def begin(self) -> None:
        """Before the optimizer's step: draw, then confine the step to the drawn entries."""
        self.engine.before_step(self.optimizer)

    def end(self) -> None:
        """After the optimizer's step: update the drawn entries, check what moved, close the step."""
        self.engine.after_step(self.optimizer)

    def step(self, closure=None):
        """draw → confine → `optimizer.step(closure)` → update; returns what the optimizer's step returns. An optimizer
        that holds no candidate (only a task head, say) just steps."""
        engine = self.engine
        if not engine.owns(self.optimizer):
            return self.optimizer.step(closure)
        engine.explicit.add(self.optimizer)  # the optimizer-step hooks leave this step to us
        try:
            engine.before_step(self.optimizer)  # draw, confine
            loss = self.optimizer.step(closure)
            engine.after_step(self.optimizer)  # update
        finally:
            engine.explicit.discard(self.optimizer)
        return loss

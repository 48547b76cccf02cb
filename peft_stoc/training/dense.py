"""The dense strategy of the training step (`memory="dense"`): the optimizer updates its candidates itself, from
gradients masked to the drawn entries.

Masking gradients alone does not confine an update: weight decay moves every entry, and momentum keeps moving
entries drawn at earlier steps. Before the optimizer runs, `DenseStrategy.confine` therefore

* zeroes every candidate gradient outside the draw (`mask_gradient`),
* switches the optimizer's own weight decay off for the step and applies the same decay to the drawn entries
  (and, unchanged, to parameters that are not candidates, such as a task head in the same group: `DecayRedirect`),

and under the ``strict`` rule `StrictGuard` puts back every previously changed entry that was not drawn now. An
optimizer whose update rule is not known to leave zero-gradient entries alone is checked after its step against a
copy of the weights, and its step undone if it moved an entry not drawn.
"""

from __future__ import annotations

import torch

from .. import compat
from ..distributed.ranks import RankSync
from ..sampling.importance import Source, finite_means
from ..sampling.selection import draw
from .optimizer_checks import confined_by_masking, refuse_underflowing_eps

# Optimizers whose weight decay is added to the gradient (L2) unless their group says it is decoupled.
_COUPLED_DECAY = tuple(
    getattr(torch.optim, name)
    for name in ("SGD", "Adam", "Adagrad", "RMSprop", "Adamax", "NAdam", "RAdam", "Adadelta")
    if hasattr(torch.optim, name)
)


def decay_is_decoupled(optimizer: torch.optim.Optimizer, group: dict) -> bool:
    """True for AdamW-style decay (θ ← θ·(1 - lr·wd)), False for L2 decay added to the gradient.

    Raises for optimizers whose decay StocTuning does not know how to confine.
    """
    if group.get("decoupled_weight_decay", False) or isinstance(optimizer, torch.optim.AdamW):
        return True
    if isinstance(optimizer, _COUPLED_DECAY):
        return False
    raise ValueError(
        f"StocTuning cannot confine the weight decay of {type(optimizer).__name__} to the drawn entries. "
        "Set weight_decay=0 for the groups holding base parameters, or use a torch.optim optimizer "
        "(SGD, Adam, AdamW, ...)."
    )


def mask_gradient(param: torch.Tensor, drawn: torch.Tensor) -> None:
    """Zero `param.grad` everywhere except at the flat indices `drawn`."""
    grad = param.grad
    if grad is None:
        return
    if grad.is_sparse:
        raise ValueError("StocTuning needs dense gradients; create embeddings with sparse=False.")
    flat = grad.view(-1)
    if drawn.numel() == 0:
        flat.zero_()
        return
    # index_select / index_copy_: advanced indexing is much slower on a busy CPU.
    kept = flat.index_select(0, drawn)
    flat.zero_()
    flat.index_copy_(0, drawn, kept)


class DecayRedirect:
    """Takes weight decay out of the optimizer's hands for one step and applies it only where allowed."""

    def __init__(self):
        self._suspended: dict[int, tuple[dict, float]] = {}

    def apply(self, optimizer: torch.optim.Optimizer, drawn: dict[int, torch.Tensor]) -> None:
        """`drawn` maps id(candidate parameter) to its drawn flat indices; other parameters decay as usual."""
        for group in optimizer.param_groups:
            held = self._suspended.get(id(group))
            decay = held[1] if held is not None else float(group.get("weight_decay", 0) or 0)
            if decay == 0:
                continue
            decoupled = decay_is_decoupled(optimizer, group)
            self._suspended[id(group)] = (group, decay)
            group["weight_decay"] = 0.0
            lr = float(group["lr"])
            sign = -1.0 if group.get("maximize", False) else 1.0
            # A fused optimizer stepped by GradScaler divides the still-scaled gradients by `grad_scale` itself:
            # L2 decay added to them now must be scaled up alike.
            grad_scale = getattr(optimizer, "grad_scale", None)
            if grad_scale is not None:
                sign *= float(grad_scale)
            with torch.no_grad():
                for param in group["params"]:
                    if param.grad is None:
                        continue  # torch optimizers skip such parameters entirely, decay included
                    index = drawn.get(id(param))
                    if decoupled:
                        _scale(param, 1.0 - lr * decay, index)
                    else:
                        _add_to_grad(param, sign * decay, index)

    def restore(self) -> None:
        """Give each group its weight decay back."""
        for group, decay in self._suspended.values():
            group["weight_decay"] = decay
        self._suspended.clear()


def _scale(param: torch.Tensor, factor: float, index: torch.Tensor | None) -> None:
    if index is None:
        param.mul_(factor)
    elif index.numel():
        flat = param.view(-1)
        flat.index_copy_(0, index, flat.index_select(0, index) * factor)


def _add_to_grad(param: torch.Tensor, alpha: float, index: torch.Tensor | None) -> None:
    if index is None:
        param.grad.add_(param, alpha=alpha)
    elif index.numel():
        grad = param.grad.view(-1)
        grad.index_add_(0, index, param.detach().view(-1).index_select(0, index).to(grad.dtype), alpha=alpha)


class StrictGuard:
    """Under the strict rule: remember the changed-but-not-drawn entries before a step, put them back after."""

    def __init__(self):
        self._saved: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def save(self, param: torch.Tensor, changed: torch.Tensor, drawn: torch.Tensor) -> None:
        if changed.numel() == 0:
            return
        keep = changed[~torch.isin(changed, drawn)]
        if keep.numel():
            self._saved.append((param, keep, param.detach().view(-1)[keep].clone()))

    def restore(self) -> None:
        with torch.no_grad():
            for param, index, values in self._saved:
                param.view(-1)[index] = values
        self._saved.clear()


class DenseStrategy:
    """The step with dense gradients: drawn from at the step, masked, and applied by the optimizer itself."""

    def __init__(self, engine, given: list[torch.Tensor] | None = None):
        self.engine = engine
        self.decay = DecayRedirect()
        self.strict = StrictGuard()
        self.given = given  # a draw already made from gradients consumed before leaving the lean mode
        self.drawn_by_id: dict[int, torch.Tensor] = {}
        self.undo: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # weights before an unknown rule's step

    gradients = None  # no gradient is consumed during the backward

    def check(self, optimizer) -> None:
        """Nothing to check before the scaler's word: the dense checks run in `draw`."""

    def draw(self, optimizer) -> list[torch.Tensor] | None:
        refuse_underflowing_eps(optimizer, self.engine.candidates)
        self._keep_for_undo(optimizer)
        engine = self.engine
        given, self.given = self.given, None
        if given is not None:
            return given
        bad = self._nonfinite_candidates()
        if bad:
            engine.skip(optimizer, reason=f"{engine.tracker.nonfinite_reason(bad)}. No weight changed.")
            return None
        if engine.reuses_mask():
            return engine.last_draw
        return self._fresh_draw()

    def _fresh_draw(self) -> list[torch.Tensor]:
        engine = self.engine
        sync = engine.sync_statistics()
        budgeted = engine.max_changed is not None
        sources = [
            Source(c.param, c.param.grad, engine.tracker.means(c), engine.patch.index.get(c.name) if budgeted else None)
            for c in engine.candidates
        ]
        max_new = max(0, engine.max_changed - engine.patch.count) if budgeted else None
        drawn = draw(sources, engine.k, engine.config.selection, engine.generator(), max_new=max_new)
        if isinstance(sync, RankSync):
            sync.check_draw(drawn)
        return drawn

    def _nonfinite_candidates(self) -> list[str]:
        """Candidates whose gradient or μ is not finite (their importance would be NaN or inf)."""
        engine = self.engine
        grads = [(c, c.param.grad) for c in engine.candidates if c.param.grad is not None]
        if not grads:
            return []
        norms = compat.foreach_norm([g for _, g in grads])
        bad = [c.name for (c, _), norm in zip(grads, norms) if not bool(torch.isfinite(norm))]
        return bad + [c.name for c in engine.candidates if not finite_means(engine.tracker.means(c))]

    def confine(self, drawn: list[torch.Tensor], optimizer) -> None:
        """Record the originals of the drawn entries, mask the gradients to them, and redirect weight decay."""
        engine = self.engine
        self.drawn_by_id = {id(c.param): index for c, index in zip(engine.candidates, drawn)}
        strict = engine.config.update_rule == "strict"
        for candidate, index in zip(engine.candidates, drawn):
            if strict and candidate.name in engine.patch.index:
                self.strict.save(candidate.param, engine.patch.index[candidate.name], index)
            if index.numel():
                engine.patch.record(candidate.name, candidate.param, index)
            mask_gradient(candidate.param, index)
        self.decay.apply(optimizer, self.drawn_by_id)
        engine.stats.grad_bytes = sum(
            c.param.grad.numel() * c.param.grad.element_size() for c in engine.candidates if c.param.grad is not None
        )

    def join(self, optimizer) -> None:
        """A second optimizer in the same step: the gradients are masked already, only its decay needs confining."""
        self.decay.apply(optimizer, self.drawn_by_id)

    def update(self, optimizer) -> None:
        """The optimizer has updated the weights: weight decay and the strict rule are given back, and every entry
        outside the record of originals is checked (against a copy, for an update rule not known to confine)."""
        self.detach()
        kept, self.undo = self.undo, None
        if kept is None:
            self.engine.audit.take_touched()
        else:
            self._verify_or_undo(optimizer, kept)

    def _keep_for_undo(self, optimizer) -> None:
        """Before the step of an optimizer whose update rule StocTuning does not know: a copy of the candidates it
        holds, so that a step that moves an entry not drawn can be undone exactly (`update`)."""
        if confined_by_masking(optimizer):
            return
        held = self.engine.checks.held(optimizer)
        self.undo = [(c.param, c.param.detach().clone()) for c in self.engine.candidates if id(c.param) in held]

    def _verify_or_undo(self, optimizer, kept: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """After such a step: every entry outside the record of originals must be as it was, or the whole step is
        undone (the weights it held written back from the copy) and refused."""
        try:
            self.engine.audit.verify(
                allowed=self.engine.patch,
                context=(
                    f"in a step of {type(optimizer).__name__} although it was not drawn: this optimizer moves "
                    "entries whose gradient is zero, so StocTuning cannot confine it. Use SGD, Adam or AdamW from "
                    "torch.optim."
                ),
            )
        except RuntimeError as error:
            with torch.no_grad():
                for param, before in kept:
                    param.copy_(before)
            raise RuntimeError(
                f"{error} The candidate weights were put back as they were before this step (the optimizer's own "
                "state did advance: start it afresh before training on)."
            ) from None

    def drop_pending(self) -> None:
        """Nothing is pending between a dense step's draw and its update but the optimizer's own step."""

    def finish(self) -> None:
        """Nothing of a dense step outlives it."""

    def abandon(self) -> None:
        """The step was abandoned before the optimizer ran: nothing of it is held."""
        self.given = None

    def detach(self) -> None:
        """Give the optimizer its weight decay back and the strict rule its entries."""
        self.decay.restore()
        self.strict.restore()

    def changed_count(self) -> int:
        """Entries changed so far."""
        return self.engine.patch.count

    def masters(self) -> dict:
        return {}
